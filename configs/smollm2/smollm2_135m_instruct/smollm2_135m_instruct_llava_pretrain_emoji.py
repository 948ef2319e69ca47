"""Stage 1 of LLaVA-style training: the projector alone learns to caption emoji (LLM and encoder frozen).

SmolLM2-135M-Instruct and EfficientNet-Lite0 stay as they are; only the MLP projector trains, on
"An emoji of a banana." captions of the emoji of Debian's fonts-noto-color-emoji. Then set
pretrained_projector in smollm2_135m_instruct_llava_lora_emoji (stage 2, instruction tuning) to this
run's checkpoint. Trains on a 2-core CPU in a few minutes.
"""
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import AmpOptimWrapper
from mmengine.visualization import LocalVisBackend, TensorboardVisBackend, Visualizer
from torch.optim import AdamW

from toolkit.data.samplers import LengthGroupedSampler
from toolkit.engine.hooks import LossPlotHook, ProgressBarHook, SummaryHook, ThroughputHook
from toolkit.engine.log_processor import LogProcessor
from toolkit.engine.loops import TrainLoop
from toolkit.engine.schedule import WarmupDecayLR
from toolkit.model.loader import load_causal_lm
from toolkit.multimodal.data import build_image_split_dataset, image_collate_fn
from toolkit.multimodal.hooks import ImageDatasetInfoHook
from toolkit.multimodal.model import LlavaFinetune
from toolkit.multimodal.tokens import load_tokenizer_with_tokens

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model: an embedded alias, a local HF folder or a hub id; the vision encoder: the embedded
# 'efficientnet-lite0' or a local HF vision model folder (CLIP / SigLIP / ViT ...)
pretrained_model_name_or_path = 'smollm2-135m-instruct'
vision_encoder = 'efficientnet-lite0'
image_size = 224               # pictures are padded to a square and resized to this
image_pool = 2                 # the 7x7 feature map (224 px) averaged down to 2x2 tokens: short samples for a
                               # CPU; None: one token per cell (49); stage 2 must use the same
image_tokens = 4               # tokens per picture: image_pool ** 2, or 49 without pooling
freeze_vision = True
freeze_llm = True              # stage 1: the projector alone learns

# Data: sharegpt / Qwen-VL conversations, "Picture 1: <img>path</img>\n..." with paths relative to the
# data file's folder; 'emoji-small_captions_train': captions of 110 animal and food emoji (packaged)
data_source = 'emoji-small_captions_train'
image_folder = None            # where relative image paths start (default: the data file's folder)
dataset_map_fn = 'sharegpt'
prompt_template = 'chatml'
system = None
special_tokens = []            # e.g. ['<ref>', '</ref>', '<box>', '</box>']: each a new token whose embedding
                               # (and LM-head row) trains; [] keeps such grounding tags as plain text
max_length = 128

# Schedule
batch_size = 8
accumulative_counts = 1
max_iters = 100
lr = 2e-3
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.05
lr_scheduler_type = 'cosine'
amp_dtype = 'bfloat16'         # on a GPU; fp32 on CPU

save_steps = 100
save_total_limit = 2
logging_steps = 5

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(type=load_tokenizer_with_tokens, path=pretrained_model_name_or_path, special_tokens=special_tokens)

model = dict(
    type=LlavaFinetune,
    llm=dict(type=load_causal_lm, path=pretrained_model_name_or_path, dtype='float32'),
    vision_encoder=vision_encoder,
    tokenizer=tokenizer,
    image_size=image_size,
    image_pool=image_pool,
    freeze_vision=freeze_vision,
    projector=dict(depth=2),
    freeze_llm=freeze_llm)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=build_image_split_dataset,
    split='train',
    tokenizer=tokenizer,
    source=data_source,
    image_folder=image_folder,
    map_fn=dataset_map_fn,
    template=prompt_template,
    system=system,
    max_length=max_length,
    image_size=image_size,
    image_tokens=image_tokens)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,
    dataset=train_dataset,
    sampler=dict(type=LengthGroupedSampler, batch_size=batch_size),
    collate_fn=dict(type=image_collate_fn))

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

train_cfg = dict(type=TrainLoop, max_iters=max_iters)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=ImageDatasetInfoHook, tokenizer=tokenizer),
    dict(type=ThroughputHook),
    dict(type=LossPlotHook, interval=logging_steps),
    dict(type=ProgressBarHook),
    dict(type=SummaryHook),
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=logging_steps),
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
log_processor = dict(type=LogProcessor, by_epoch=False, window_size=logging_steps)
