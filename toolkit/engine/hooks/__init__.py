"""tk's mmengine hooks, one per file."""
from .dataset_info import DatasetInfoHook
from .evaluate_chat import EvaluateChatHook

__all__ = ["DatasetInfoHook", "EvaluateChatHook"]
