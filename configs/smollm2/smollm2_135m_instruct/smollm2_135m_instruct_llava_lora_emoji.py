"""SmolLM2-135M-Instruct sees pictures: EfficientNet-Lite0 (frozen) + MLP projector + LoRA, naming emoji.

LLaVA-style instruction tuning on real images that install offline: the emoji of Debian's
fonts-noto-color-emoji, rendered once and named by unicodedata ("What is this emoji called?" -> "banana").
Trains on a 2-core CPU in a few minutes. Evaluate held-out pictures before and after with
`python -m toolkit.multimodal.evaluate` (docs/multimodal.md). Stage 1 (projector pre-training on
captions) is smollm2_135m_instruct_llava_pretrain_emoji; set pretrained_projector to its checkpoint.
"""
from mmengine.hooks import CheckpointHook, IterTimerHook, LoggerHook, ParamSchedulerHook
from mmengine.optim import AmpOptimWrapper
from mmengine.visualization import LocalVisBackend, TensorboardVisBackend, Visualizer
from peft import LoraConfig
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
                               # CPU; None: one token per cell (49)
image_tokens = 4               # tokens per picture: image_pool ** 2, or 49 without pooling
freeze_vision = True
pretrained_projector = None    # stage 1's checkpoint (work_dirs/..._pretrain_emoji/iter_N.pth) or None

# Data: sharegpt / Qwen-VL conversations, "Picture 1: <img>path</img>\n..." with paths relative to the
# data file's folder; 'emoji-small_names_train': 110 animal and food emoji (packaged, rendered on first use)
data_source = 'emoji-small_names_train'
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
max_iters = 200                # ~14 epochs of the 110 emoji
lr = 2e-3
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.05
lr_scheduler_type = 'cosine'
amp_dtype = 'bfloat16'         # on a GPU; fp32 on CPU

save_steps = 200
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
    pretrained_projector=pretrained_projector,
    adapter=dict(
        type=LoraConfig,
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'],
        bias='none',
        task_type='CAUSAL_LM'))

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
