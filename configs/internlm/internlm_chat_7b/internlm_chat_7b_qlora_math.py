"""InternLM-chat-7B, QLoRA (nf4, double quant, bf16 compute) on the MATH dataset, 3 epochs.

MATH is read from its release layout: a folder tree of per-problem JSON files with `problem` and
`solution` (e.g. MATH/train/algebra/1.json). Needs one CUDA GPU with about 10 GB and bitsandbytes
(`pip install -e ".[bnb]"`). InternLM-chat-7B ships its model code with the weights, so this config
turns `trust_remote_code` on: only do that for weights you trust.
"""
import torch
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from mmengine.visualization import LocalVisBackend, TensorboardVisBackend, Visualizer
from peft import LoraConfig
from torch.optim import AdamW
from transformers import BitsAndBytesConfig

from toolkit.data.collate import sft_collate_fn
from toolkit.data.dataset import build_sft_dataset
from toolkit.data.samplers import LengthGroupedSampler
from toolkit.engine.hooks import DatasetInfoHook, EvaluateChatHook
from toolkit.engine.loops import TrainLoop
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
warmup_ratio = 0.03

# Checkpoints and evaluation
save_steps = 500
save_total_limit = 2
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
    gradient_checkpointing=True,
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
    type=build_sft_dataset,
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

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='bfloat16')

param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5, by_epoch=True, begin=0, end=warmup_ratio * max_epochs,
         convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs,
         end=max_epochs, convert_to_iter_based=True),
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(type=EvaluateChatHook, tokenizer=tokenizer, every_n_iters=evaluation_freq,
         evaluation_inputs=evaluation_inputs, prompt_template=prompt_template, system=system),
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=save_steps, max_keep_ckpts=save_total_limit),
)

env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend), dict(type=TensorboardVisBackend)])
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
log_processor = dict(by_epoch=False)
