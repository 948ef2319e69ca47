"""Registries for what a config may name by string.

A config can always point at a callable directly instead (``type=LoraConfig``); the registries let
it say ``dataset_map_fn='alpaca'`` or ``dict(type='EvaluateChatHook')`` and let ``tk`` list choices.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import Registry

#: record -> {"messages": [...]} functions, one per data format (toolkit/data/formats/).
MAP_FNS = Registry("map_fn", locations=["toolkit.data.formats"])
#: mmengine hooks that tk adds (toolkit/engine/hooks/); children of mmengine's HOOKS.
HOOKS = Registry("hook", parent=MMENGINE_HOOKS, locations=["toolkit.engine.hooks"])
#: adapter builders: name -> callable(model, **cfg) returning the adapted model.
ADAPTERS = Registry("adapter", locations=["toolkit.model.adapters"])
