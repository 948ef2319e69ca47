"""Golden ids and labels for every named template: a 2-turn conversation with a system prompt.

SmolLM2's real tokenizer encodes them; the special tokens of other models (``<|eot_id|>``, ``<end_of_turn>``)
are plain text to it, which still pins every template's exact text, piece boundaries and label mask. Each
entry also shows the text with the untrained part marked: the line to read when checking a template
against its model's own chat format.
"""
import pytest

from toolkit.data.encode import IGNORE_INDEX, encode_conversation
from toolkit.data.render import render_masked
from toolkit.data.templates import PROMPT_TEMPLATES, get_template

# name: (text with [no loss]...[/no loss] around the untrained part, input_ids, positions of trained labels)
GOLDEN = {
    'default': (
        '[no loss]<|System|>:Be brief.\n<|User|>:Hi\n<|Bot|>:[/no loss]Hello!<|im_end|>[no loss]\n'
        '<|User|>:2+2?\n<|Bot|>:[/no loss]4<|im_end|>[no loss]\n[/no loss]',
        [44, 108, 18403, 108, 46, 42, 6077, 5453, 30, 198, 44, 108, 11126, 108, 46, 42, 26843, 198, 44, 108, 24412,
         108, 46, 42, 19556, 17, 2, 198, 44, 108, 11126, 108, 46, 42, 34, 27, 34, 47, 198, 44, 108, 24412, 108, 46,
         42, 36, 2, 198],
        [24, 25, 26, 45, 46]),
    'alpaca': (
        '[no loss]Be brief.\n\n### Instruction:\nHi\n\n### Response:\n[/no loss]Hello!<|im_end|>[no loss]\n'
        '\n### Instruction:\n2+2?\n\n### Response:\n[/no loss]4<|im_end|>[no loss]\n\n[/no loss]',
        [6077, 5453, 30, 198, 198, 3757, 20880, 42, 198, 26843, 198, 198, 3757, 14212, 42, 198, 19556, 17, 2, 1116,
         3757, 20880, 42, 198, 34, 27, 34, 47, 198, 198, 3757, 14212, 42, 198, 36, 2, 1116],
        [16, 17, 18, 34, 35]),
    'vicuna': (
        '[no loss]Be brief. USER: Hi ASSISTANT:[/no loss]Hello!<|im_end|>[no loss]USER: 2+2? ASSISTANT:[/no loss]4<|im_end|>',
        [6077, 5453, 30, 2038, 1754, 42, 21041, 40800, 9814, 17321, 42, 19556, 17, 2, 23824, 42, 216, 34, 27, 34, 47,
         40800, 9814, 17321, 42, 36, 2],
        [11, 12, 13, 25, 26]),
    'chatml': (
        '[no loss]<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
        '<|im_start|>assistant\n[/no loss]Hello!<|im_end|>[no loss]\n<|im_start|>user\n2+2?<|im_end|>\n'
        '<|im_start|>assistant\n[/no loss]4<|im_end|>[no loss]\n[/no loss]',
        [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198, 1,
         4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198, 36, 2, 198],
        [18, 19, 20, 35, 36]),
    'qwen_chat': (
        '[no loss]<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
        '<|im_start|>assistant\n[/no loss]Hello!<|im_end|>[no loss]\n<|im_start|>user\n2+2?<|im_end|>\n'
        '<|im_start|>assistant\n[/no loss]4<|im_end|>[no loss]\n[/no loss]',
        [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198, 1,
         4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198, 36, 2, 198],
        [18, 19, 20, 35, 36]),
    'internlm_chat': (
        '[no loss]<|System|>:Be brief.\n<|User|>:Hi<eoh>\n<|Bot|>:[/no loss]Hello!<eoa>[no loss]\n'
        '<|User|>:2+2?<eoh>\n<|Bot|>:[/no loss]4<eoa>[no loss]\n[/no loss]',
        [44, 108, 18403, 108, 46, 42, 6077, 5453, 30, 198, 44, 108, 11126, 108, 46, 42, 26843, 44, 85, 1299, 46, 198,
         44, 108, 24412, 108, 46, 42, 19556, 17, 44, 85, 9677, 46, 198, 44, 108, 11126, 108, 46, 42, 34, 27, 34,
         15137, 85, 1299, 46, 198, 44, 108, 24412, 108, 46, 42, 36, 44, 85, 9677, 46, 198],
        [28, 29, 30, 31, 32, 33, 55, 56, 57, 58, 59]),
    'internlm2_chat': (
        '[no loss]<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
        '<|im_start|>assistant\n[/no loss]Hello!<|im_end|>[no loss]\n<|im_start|>user\n2+2?<|im_end|>\n'
        '<|im_start|>assistant\n[/no loss]4<|im_end|>[no loss]\n[/no loss]',
        [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198, 1,
         4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198, 36, 2, 198],
        [18, 19, 20, 35, 36]),
    'llama2_chat': (
        '[no loss][INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n'
        'Hi [/INST][/no loss]Hello!<|im_end|>[no loss]<s>[INST] 2+2? [/INST][/no loss]4<|im_end|>[no loss]<s>[/no loss]',
        [75, 39637, 77, 22646, 67, 19572, 7791, 198, 6077, 5453, 30, 198, 44, 9617, 67, 19572, 7791, 198, 198, 26843,
         933, 31, 39637, 77, 19556, 17, 2, 44, 99, 46, 75, 39637, 77, 216, 34, 27, 34, 47, 933, 31, 39637, 77, 36, 2,
         44, 99, 46],
        [24, 25, 26, 42, 43]),
    'llama3_chat': (
        '[no loss]<|start_header_id|>system<|end_header_id|>\n\n'
        'Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
        'Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
        '[/no loss]Hello!<|eot_id|>[no loss]<|start_header_id|>user<|end_header_id|>\n\n'
        '2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[/no loss]4<|eot_id|>',
        [44, 108, 3738, 79, 12476, 79, 311, 108, 46, 9690, 44, 108, 486, 79, 12476, 79, 311, 108, 46, 198, 198, 6077,
         5453, 15602, 108, 85, 320, 79, 311, 108, 21198, 108, 3738, 79, 12476, 79, 311, 108, 46, 4093, 44, 108, 486,
         79, 12476, 79, 311, 108, 46, 198, 198, 26843, 44, 108, 85, 320, 79, 311, 108, 21198, 108, 3738, 79, 12476,
         79, 311, 108, 46, 520, 9531, 44, 108, 486, 79, 12476, 79, 311, 108, 46, 1116, 19556, 17, 44, 108, 85, 320,
         79, 311, 108, 46, 44, 108, 3738, 79, 12476, 79, 311, 108, 46, 4093, 44, 108, 486, 79, 12476, 79, 311, 108,
         46, 198, 198, 34, 27, 34, 15137, 108, 85, 320, 79, 311, 108, 21198, 108, 3738, 79, 12476, 79, 311, 108, 46,
         520, 9531, 44, 108, 486, 79, 12476, 79, 311, 108, 46, 1116, 36, 44, 108, 85, 320, 79, 311, 108, 46],
        [80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 142, 143, 144, 145, 146, 147, 148, 149, 150]),
    'mistral': (
        '[no loss][INST] Be brief.\n\n'
        'Hi [/INST][/no loss]Hello!<|im_end|>[no loss][INST] 2+2? [/INST][/no loss]4<|im_end|>',
        [75, 39637, 77, 1934, 5453, 30, 198, 198, 26843, 933, 31, 39637, 77, 19556, 17, 2, 75, 39637, 77, 216, 34, 27,
         34, 47, 933, 31, 39637, 77, 36, 2],
        [13, 14, 15, 28, 29]),
    'gemma': (
        '[no loss]<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n'
        '[/no loss]Hello!<end_of_turn>[no loss]\n<start_of_turn>user\n2+2?<end_of_turn>\n'
        '<start_of_turn>model\n[/no loss]4<end_of_turn>[no loss]\n[/no loss]',
        [44, 3738, 79, 1714, 79, 20589, 46, 4093, 198, 6077, 5453, 30, 198, 198, 26843, 44, 486, 79, 1714, 79, 20589,
         46, 198, 44, 3738, 79, 1714, 79, 20589, 46, 3980, 198, 19556, 17, 44, 486, 79, 1714, 79, 20589, 46, 198, 44,
         3738, 79, 1714, 79, 20589, 46, 4093, 198, 34, 27, 34, 15137, 486, 79, 1714, 79, 20589, 46, 198, 44, 3738, 79,
         1714, 79, 20589, 46, 3980, 198, 36, 44, 486, 79, 1714, 79, 20589, 46, 198],
        [32, 33, 34, 35, 36, 37, 38, 39, 40, 71, 72, 73, 74, 75, 76, 77, 78]),
    'deepseek': (
        '[no loss]Be brief.\n\nUser: Hi\n\n'
        'Assistant: [/no loss]Hello!<｜end▁of▁sentence｜>[no loss]User: 2+2?\n\n'
        'Assistant: [/no loss]4<｜end▁of▁sentence｜>',
        [6077, 5453, 30, 198, 198, 11126, 42, 21041, 198, 198, 9519, 9531, 42, 216, 19556, 17, 44, 186, 138, 246, 486,
         11007, 219, 1714, 11007, 219, 28205, 186, 138, 246, 46, 11126, 42, 216, 34, 27, 34, 47, 198, 198, 9519, 9531,
         42, 216, 36, 44, 186, 138, 246, 486, 11007, 219, 1714, 11007, 219, 28205, 186, 138, 246, 46],
        [14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53,
         54, 55, 56, 57, 58, 59]),
    'phi3': (
        '[no loss]<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n'
        '[/no loss]Hello!<|end|>[no loss]\n<|user|>\n2+2?<|end|>\n<|assistant|>\n'
        '[/no loss]4<|end|>[no loss]\n[/no loss]',
        [44, 108, 9690, 108, 46, 198, 6077, 5453, 15602, 108, 486, 108, 46, 198, 44, 108, 4093, 108, 46, 198, 26843,
         44, 108, 486, 108, 46, 198, 44, 108, 520, 9531, 108, 46, 198, 19556, 17, 44, 108, 486, 108, 46, 198, 44, 108,
         4093, 108, 46, 198, 34, 27, 34, 15137, 108, 486, 108, 46, 198, 44, 108, 520, 9531, 108, 46, 198, 36, 44, 108,
         486, 108, 46, 198],
        [34, 35, 36, 37, 38, 39, 40, 64, 65, 66, 67, 68, 69]),
    'zephyr': (
        '[no loss]<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n'
        '[/no loss]Hello!</s>[no loss]\n<|user|>\n2+2?</s>\n<|assistant|>\n[/no loss]4</s>[no loss]\n'
        '[/no loss]',
        [44, 108, 9690, 108, 46, 198, 6077, 5453, 30, 9617, 99, 46, 198, 44, 108, 4093, 108, 46, 198, 26843, 9617, 99,
         46, 198, 44, 108, 520, 9531, 108, 46, 198, 19556, 17, 9617, 99, 46, 198, 44, 108, 4093, 108, 46, 198, 34, 27,
         34, 47, 9617, 99, 46, 198, 44, 108, 520, 9531, 108, 46, 198, 36, 9617, 99, 46, 198],
        [31, 32, 33, 34, 35, 58, 59, 60, 61]),
    'pretrain': (
        '[no loss]Hi[/no loss]Hello!<|im_end|>[no loss]2+2?[/no loss]4<|im_end|>',
        [26843, 19556, 17, 2, 34, 27, 34, 47, 36, 2],
        [1, 2, 3, 8, 9]),
}


def test_every_named_template_has_a_golden_entry():
    assert set(GOLDEN) == set(PROMPT_TEMPLATES)
    for required in ("default", "alpaca", "vicuna", "internlm_chat", "internlm2_chat", "qwen_chat", "chatml",
                     "llama2_chat", "llama3_chat", "mistral", "gemma", "deepseek", "phi3", "zephyr"):
        assert required in GOLDEN


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_template_golden_ids_and_labels(name, tokenizer, two_turns):
    marked, ids, trained = GOLDEN[name]
    encoded = encode_conversation(two_turns, tokenizer, get_template(name), max_length=4096)
    assert encoded["input_ids"] == ids
    assert encoded["labels"] == [t if i in trained else IGNORE_INDEX for i, t in enumerate(ids)]
    assert render_masked(encoded["input_ids"], encoded["labels"], tokenizer) == marked
