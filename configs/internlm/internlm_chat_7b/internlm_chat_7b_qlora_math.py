"""InternLM-chat-7B, QLoRA (nf4, double quant, bf16 compute) on the MATH dataset, 3 epochs.

MATH is read from its release layout: a folder tree of per-problem JSON files with `problem` and
`solution` (e.g. MATH/train/algebra/1.json). Needs one CUDA GPU with about 10 GB and bitsandbytes
(`pip install -e ".[bnb]"`). InternLM-chat-7B ships its model code with the weights, so this config
turns `trust_remote_code` on: only do that for weights you trust.
"""
import torch
from mmengine.dataset import DefaultSampler
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import AmpOptimWrapper
from mmengine.visualization import LocalVisBackend, TensorboardVisBackend, Visualizer
from peft import LoraConfig
from torch.optim import AdamW
from transformers import BitsAndBytesConfig

from toolkit.data.collate import sft_collate_fn
from toolkit.data.samplers import LengthGroupedSampler
from toolkit.data.split import build_split_dataset
from toolkit.engine.hooks import (DatasetInfoHook, EvaluateChatHook, LossPlotHook, ProgressBarHook, SummaryHook,
                                  ThroughputHook)
from toolkit.engine.log_processor import LogProcessor
from toolkit.engine.loops import TrainLoop, ValLoop
from toolkit.engine.metrics import ValLoss
from toolkit.engine.schedule import WarmupDecayLR
from toolkit.model.loader import load_causal_lm, load_tokenizer
from toolkit.model.sft import SupervisedFinetune

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model: a local folder with the InternLM-chat-7B weights (or the hub id where a hub is reachable)
pretrained_model_name_or_path = 'internlm/internlm-chat-7b'
trust_remote_code = True

# Data: the MATH release's training folder
data_source = './data/MATH/train'
dataset_map_fn = 'math'
prompt_template = 'internlm_chat'
system = ''
max_length = 2048

# Schedule
batch_size = 1                 # per device
accumulative_counts = 16
max_epochs = 3
lr = 2e-4
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.03            # of all iterations (or set warmup_steps=N in param_scheduler)
lr_scheduler_type = 'cosine'   # after warmup: 'cosine', 'linear' or 'constant'
amp_dtype = 'bfloat16'         # mixed precision on a GPU: 'bfloat16' or 'float16'; None: fp32 (always on CPU)
gradient_checkpointing = True  # recompute activations in backward: less memory, ~30% slower
compile_blocks = False         # True: torch.compile each transformer block on a GPU (7B llama QLoRA on an
                               # H100: 1.97x the HF + peft baseline, docs/benchmarks.md); ignored on a CPU

# Validation, checkpoints and evaluation
val_size = 0                   # held out of the data: a fraction (0.05) or a sample count; 0: none
val_data_source = None         # or a separate validation file (then nothing is held out)
val_interval = 500             # iterations between validations (and at the end); best checkpoint by val loss
save_steps = 500
save_total_limit = 2           # newest checkpoints kept (the best one is kept besides)
logging_steps = 10             # log lines, tensorboard scalars and loss.png refresh
evaluation_freq = 500
evaluation_inputs = [
    'What is the remainder when $2^{100}$ is divided by 7?',
    'Find all real $x$ such that $x^2 - 5x + 6 = 0$.',
]

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(type=load_tokenizer, path=pretrained_model_name_or_path, trust_remote_code=trust_remote_code)

model = dict(
    type=SupervisedFinetune,
    gradient_checkpointing=gradient_checkpointing,
    compile=compile_blocks,
    llm=dict(
        type=load_causal_lm,
        path=pretrained_model_name_or_path,
        trust_remote_code=trust_remote_code,
        dtype='bfloat16',
        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            bnb_4bit_quant_type='nf4',
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)),
    adapter=dict(
        type=LoraConfig,
        r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules='all-linear',
        bias='none',
        task_type='CAUSAL_LM'))

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=build_split_dataset,
    split='train',
    val_size=val_size,
    val_source=val_data_source,
    tokenizer=tokenizer,
    source=data_source,
    map_fn=dataset_map_fn,
    template=prompt_template,
    system=system,
    max_length=max_length)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,
    dataset=train_dataset,
    sampler=dict(type=LengthGroupedSampler, batch_size=batch_size),  # batches of similar length: little padding
    collate_fn=dict(type=sft_collate_fn))

val_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,
    dataset=dict(train_dataset, split='val'),
    sampler=dict(type=DefaultSampler, shuffle=False),
    collate_fn=dict(type=sft_collate_fn))
val_evaluator = dict(type=ValLoss)  # val/loss: mean loss per trained token
val_cfg = dict(type=ValLoop)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype=amp_dtype)

param_scheduler = dict(type=WarmupDecayLR, decay=lr_scheduler_type, warmup_ratio=warmup_ratio, by_epoch=False)

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs, val_interval=val_interval)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(type=EvaluateChatHook, tokenizer=tokenizer, every_n_iters=evaluation_freq,
         evaluation_inputs=evaluation_inputs, prompt_template=prompt_template, system=system),
    dict(type=ThroughputHook),        # tokens/s, TFLOPs, MFU, peak memory
    dict(type=LossPlotHook, interval=logging_steps),  # work_dir/loss.png
    dict(type=ProgressBarHook),       # on a terminal: a bar with ETA
    dict(type=SummaryHook),           # at the end: where everything is (work_dir/summary.json)
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=logging_steps),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=save_steps, max_keep_ckpts=save_total_limit,
                    save_best='val/loss', rule='less'),
)

env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend), dict(type=TensorboardVisBackend)])
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
log_processor = dict(type=LogProcessor, by_epoch=False, window_size=logging_steps)  # train loss: interval mean
