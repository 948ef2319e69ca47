"""tk's mmengine hooks, one per file."""
from .dataset_info import DatasetInfoHook
from .evaluate_chat import EvaluateChatHook
from .loss_plot import LossPlotHook
from .progress import ProgressBarHook
from .random_state import RandomStateHook
from .summary import SummaryHook
from .throughput import ThroughputHook

__all__ = ["DatasetInfoHook", "EvaluateChatHook", "LossPlotHook", "ProgressBarHook", "RandomStateHook",
           "SummaryHook", "ThroughputHook"]
