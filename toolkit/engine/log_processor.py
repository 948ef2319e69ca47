"""``LogProcessor``: mmengine's, except that a validation loss is logged as computed.

mmengine averages every key matching ``loss`` over the last ``window_size`` values it holds. For the
training loss that is the mean over the logging interval (set ``window_size`` to it), but ``val/loss``
gets one value per validation, so the log, ``scalars.json`` and tensorboard would show the mean of the
last validations instead of the latest; and the per-batch validation lines would repeat the previous
validation's loss as if it were the current one (they leave it out here).
"""
from mmengine.registry import LOG_PROCESSORS
from mmengine.runner import LogProcessor as MMEngineLogProcessor


@LOG_PROCESSORS.register_module(force=True)
class LogProcessor(MMEngineLogProcessor):
    _in_iteration_log = False

    def get_log_after_iter(self, runner, batch_idx: int, mode: str):
        self._in_iteration_log = True
        try:
            return super().get_log_after_iter(runner, batch_idx, mode)
        finally:
            self._in_iteration_log = False

    def _collect_scalars(self, custom_cfg, runner, mode, reserve_prefix=False) -> dict:
        tag = super()._collect_scalars(custom_cfg, runner, mode, reserve_prefix)
        if mode == "train":
            return tag
        scalars = runner.message_hub.log_scalars
        for key in [key for key in tag if "loss" in key]:
            full = key if reserve_prefix else f"{mode}/{key}"
            if self._in_iteration_log:
                del tag[key]
            elif full in scalars:
                tag[key] = scalars[full].current()
        return tag
