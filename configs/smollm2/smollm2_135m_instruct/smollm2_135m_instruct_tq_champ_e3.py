"""SmolLM2-135M-Instruct + a TorchQuantum-style circuit (tq) adapter on CHAMP competition math, 3 epochs.

The embedded default: the model and the data install offline, and it trains on a 2-core CPU in
under 10 minutes (on a GPU it runs as it is). Copy it with `tk copy-cfg`, edit, `tk train` it.
"""
from mmengine.dataset import DefaultSampler
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import AmpOptimWrapper
from mmengine.visualization import LocalVisBackend, TensorboardVisBackend, Visualizer
from torch.optim import AdamW

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
# Model: an embedded alias, a local HF folder or a hub id
pretrained_model_name_or_path = 'smollm2-135m-instruct'

# Data
data_source = 'champ'          # packaged CHAMP problems; or a json/jsonl/parquet/csv file of your own
dataset_map_fn = 'champ'       # record format (tk list-dataset-format)
prompt_template = 'chatml'     # SmolLM2's own chat format
system = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'
max_length = 320
drop_long_samples = True    # keep whole solutions (153 of the 270 problems fit) so the CPU run stays short

# Schedule
batch_size = 4                 # per device
accumulative_counts = 1
max_epochs = 3
lr = 3e-4
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.03            # of all iterations (or set warmup_steps=N in param_scheduler)
lr_scheduler_type = 'cosine'   # after warmup: 'cosine', 'linear' or 'constant'
amp_dtype = 'bfloat16'         # mixed precision on a GPU: 'bfloat16' or 'float16'; None: fp32 (always on CPU)
gradient_checkpointing = False  # recompute activations in backward: less memory, ~30% slower

# Validation, checkpoints and evaluation
val_size = 0.05                # held out of the data: a fraction (0.05) or a sample count; 0: none
val_data_source = None         # or a separate validation file (then nothing is held out)
val_interval = 50              # iterations between validations (and at the end); best checkpoint by val loss
save_steps = 100
save_total_limit = 2           # newest checkpoints kept (the best one is kept besides)
logging_steps = 10             # log lines, tensorboard scalars and loss.png refresh
evaluation_freq = 1000
evaluation_inputs = [
    'Find the number of positive divisors of 12.',
]

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(type=load_tokenizer, path=pretrained_model_name_or_path)

model = dict(
    type=SupervisedFinetune,
    llm=dict(type=load_causal_lm, path=pretrained_model_name_or_path, dtype='float32'),
    gradient_checkpointing=gradient_checkpointing,
    # tq: φ = π·tanh(A·x) encoded by RY, n_layers blocks of U3 + CU3 ring, <Z_k> read out, Δy = alpha/n · B · z.
    # n_qubits=8: 466,560 trainable parameters on q_proj,v_proj. Not mergeable (use it with --adapter).
    adapter=dict(
        type='tq',
        n_qubits=8,
        n_layers=2,
        alpha=16,
        dropout=0.05,
        target_modules=['q_proj', 'v_proj']))

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
    max_length=max_length,
    drop_long_samples=drop_long_samples)

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
# AmpOptimWrapper trains in bf16 on a GPU; without CUDA tk falls back to fp32.
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
         evaluation_inputs=evaluation_inputs, prompt_template=prompt_template, system=system,
         max_new_tokens=160),
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
