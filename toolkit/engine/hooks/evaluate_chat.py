"""Answer fixed prompts before training, every N iterations and at the end, to watch what is learnt."""
from __future__ import annotations

import json
from pathlib import Path

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ...chat.session import ChatSession
from ...model.loader import build_tokenizer
from ...registry import HOOKS
from .random_state import capture_rng_state, restore_rng_state


@HOOKS.register_module()
class EvaluateChatHook(Hook):
    """Greedy answers to ``evaluation_inputs``; printed to the log and saved in ``work_dir/eval_chat.jsonl``."""

    priority = "LOW"

    def __init__(self, tokenizer, evaluation_inputs, prompt_template="chatml", system=None,
                 every_n_iters: int | None = None, max_new_tokens: int = 256):
        self.tokenizer = build_tokenizer(tokenizer)
        self.inputs = [evaluation_inputs] if isinstance(evaluation_inputs, str) else list(evaluation_inputs)
        self.template, self.system = prompt_template, system
        self.every_n_iters, self.max_new_tokens = every_n_iters, max_new_tokens

    def _answer(self, runner, tag: str, trained_iters: int) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        records, rng = [], capture_rng_state()  # sampling must not shift training's dropout masks
        for prompt in self.inputs:
            session = ChatSession(model.llm, self.tokenizer, self.template, self.system,
                                  max_new_tokens=self.max_new_tokens)
            reply = session.ask(prompt)
            runner.logger.info(f"eval-chat ({tag})\n>>> {prompt}\n{reply}\n")
            records.append({"iter": trained_iters, "tag": tag, "prompt": prompt, "reply": reply})
        restore_rng_state(rng)
        with open(Path(runner.work_dir) / "eval_chat.jsonl", "a", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")

    def before_train(self, runner) -> None:
        self._answer(runner, "before training" if runner.iter == 0 else f"resumed at iter {runner.iter}", runner.iter)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.every_n_iters and self.every_n_train_iters(runner, self.every_n_iters) \
                and runner.iter + 1 < runner.max_iters:
            self._answer(runner, f"iter {runner.iter + 1}", runner.iter + 1)

    def after_train(self, runner) -> None:
        self._answer(runner, "after training", runner.iter)
