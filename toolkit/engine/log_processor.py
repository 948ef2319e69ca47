"""``LogProcessor``: mmengine's, except that a validation loss is logged as computed.

mmengine averages every key matching ``loss`` over the last ``window_size`` values it holds. For the
training loss that is the mean over the logging interval (set ``window_size`` to it), but ``val/loss``
gets one value per validation, so the log, ``scalars.json`` and tensorboard would show the mean of the
last validations instead of the latest.
"""
from mmengine.registry import LOG_PROCESSORS
from mmengine.runner import LogProcessor as MMEngineLogProcessor


@LOG_PROCESSORS.register_module(force=True)
class LogProcessor(MMEngineLogProcessor):
    def _collect_scalars(self, custom_cfg, runner, mode, reserve_prefix=False) -> dict:
        tag = super()._collect_scalars(custom_cfg, runner, mode, reserve_prefix)
        if mode != "train":
            scalars = runner.message_hub.log_scalars
            for key in tag:
                full = key if reserve_prefix else f"{mode}/{key}"
                if "loss" in key and full in scalars:
                    tag[key] = scalars[full].current()
        return tag
