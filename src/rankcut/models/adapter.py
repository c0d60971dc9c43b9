"""What rankcut needs to know about a model's layout, asked of one small adapter object.

The default ``ModelAdapter`` reads a Hugging Face model's own structure: the blocks it
declares in ``_no_split_modules`` (its unit of device placement), failing that the
longest ``nn.ModuleList`` of same-typed modules; ``get_input_embeddings`` /
``get_output_embeddings``; ``main_input_name``. A family that this does not describe is
supported by one small subclass registered with ``register_adapter`` (SliceGPT's
``model_adapter.py`` idea), never by branching on model names.

Example:
    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb = torch.nn.Embedding(10, 4)
    ...         self.trunk = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])
    ...     def forward(self, tokens):
    ...         return self.trunk[1](self.trunk[0](self.emb(tokens)))
    >>> @register_adapter(Net)
    ... class NetAdapter(ModelAdapter):
    ...     input_name = "tokens"
    ...     def blocks(self):
    ...         return [("trunk.0", self.model.trunk[0])]
    >>> adapter = adapter_for(Net())
    >>> adapter.blocks()[0][0], adapter.input_name, [n for n, _ in adapter.embeddings()]
    ('trunk.0', 'tokens', ['emb'])
    >>> sorted(adapter.inputs(torch.zeros(1, 3, dtype=torch.long), use_cache=False))
    ['tokens']
    >>> unregister_adapter(NetAdapter)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import Tensor, nn

from ..errors import RankcutError

#: What a registered adapter is chosen by: a model class (instances of it and of its
#: subclasses) or a predicate over the model.
Match = type | Callable[[nn.Module], bool]


class ModelAdapter:
    """A model's decoder blocks, embeddings, head and token-input argument.

    Subclass it and override what the default discovery gets wrong for a family, then
    register the subclass with ``register_adapter``; ``adapter_for`` picks it.

    Attributes:
        model: the model described.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def input_name(self) -> str:
        """The forward's keyword argument for token ids (``input_ids`` for HF models).

        Example:
            >>> import torch
            >>> ModelAdapter(torch.nn.Linear(2, 2)).input_name
            'input_ids'
        """
        return getattr(self.model, "main_input_name", None) or "input_ids"

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of each repeated transformer block, in execution order:
        the ``nn.ModuleList`` whose modules are of a type the model declares in
        ``_no_split_modules``, else the longest ``nn.ModuleList`` of same-typed modules
        (``[]`` when there is none).

        Example:
            >>> import torch
            >>> stack = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3))
            >>> [name for name, _ in ModelAdapter(stack).blocks()]
            ['0.0', '0.1', '0.2']
        """
        declared = set(getattr(self.model, "_no_split_modules", None) or [])
        candidates: list[list[tuple[str, nn.Module]]] = []
        for name, module in self.model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            kinds = {type(child).__name__ for child in module}
            if len(kinds) != 1:
                continue
            prefix = f"{name}." if name else ""
            blocks = [(f"{prefix}{i}", child) for i, child in enumerate(module)]
            if kinds & declared:
                return blocks
            candidates.append(blocks)
        if not candidates:
            return []
        # Fallback: the longest homogeneous ModuleList is the stack of blocks.
        return max(candidates, key=len)

    def embeddings(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the embeddings: the token embedding first
        (``get_input_embeddings``, when the model has it), then every other
        ``nn.Embedding`` outside the blocks (positions, token types), in model order.

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 5))
            >>> [name for name, _ in ModelAdapter(net).embeddings()]
            ['0']
        """
        token = self._hf("get_input_embeddings")
        inside = [name + "." for name, _ in self.blocks()]
        found = [
            (name, module)
            for name, module in self.model.named_modules()
            if (module is token or isinstance(module, nn.Embedding))
            and not any(name.startswith(b) for b in inside)
        ]
        return sorted(found, key=lambda item: item[1] is not token)

    def head(self) -> tuple[str, nn.Module] | None:
        """``(name, module)`` of the output head (``get_output_embeddings``: the LM head
        of a causal LM), ``None`` for a model without one (an encoder's base model).

        Example:
            >>> import torch
            >>> print(ModelAdapter(torch.nn.Linear(2, 2)).head())
            None
        """
        head = self._hf("get_output_embeddings")
        if head is None:
            return None
        return next(((n, m) for n, m in self.model.named_modules() if m is head), None)

    def inputs(self, ids: Tensor, **options) -> dict:
        """Keyword arguments that run the model on token ``ids``: the ids under
        ``input_name`` plus those of the HF-style ``options`` (``attention_mask``,
        ``labels``, ``use_cache``, ...) that the forward takes; a forward that takes
        ``**kwargs`` gets them all.

        Raises:
            RankcutError: when the forward has no argument ``input_name``.

        Example:
            >>> import torch
            >>> class Net(torch.nn.Module):
            ...     def forward(self, input_ids, attention_mask=None):
            ...         return input_ids
            >>> ids = torch.zeros(1, 3, dtype=torch.long)
            >>> sorted(ModelAdapter(Net()).inputs(ids, attention_mask=ids, use_cache=False))
            ['attention_mask', 'input_ids']
        """
        accepts = _accepted(type(self.model))
        if accepts is not None and self.input_name not in accepts:
            raise RankcutError(
                f"{type(self.model).__name__}.forward takes no argument {self.input_name!r} "
                "for token ids: register a ModelAdapter whose input_name names it"
            )
        kept = options if accepts is None else {k: v for k, v in options.items() if k in accepts}
        return {self.input_name: ids, **kept}

    def _hf(self, getter: str) -> nn.Module | None:
        method = getattr(self.model, getter, None)
        if not callable(method):
            return None
        try:
            return method()
        except (AttributeError, NotImplementedError):  # HF base classes without that part
            return None


@functools.cache
def _accepted(cls: type) -> frozenset[str] | None:
    """Keyword arguments ``cls.forward`` takes; ``None`` when it takes ``**kwargs``."""
    params = inspect.signature(cls.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


_REGISTRY: list[tuple[Callable[[nn.Module], bool], type[ModelAdapter]]] = []


def register_adapter(match: Match) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator: use the decorated ``ModelAdapter`` subclass for models that
    ``match`` (a model class, or a predicate over the model). Registered adapters are
    asked newest first, all before the default.

    Example:
        >>> @register_adapter(lambda model: getattr(model, "family", None) == "mine")
        ... class MineAdapter(ModelAdapter):
        ...     input_name = "tokens"
        >>> unregister_adapter(MineAdapter)
    """
    if isinstance(match, type):
        cls_match = match

        def predicate(model: nn.Module) -> bool:
            return isinstance(model, cls_match)
    else:
        predicate = match

    def decorate(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
        if not (isinstance(adapter, type) and issubclass(adapter, ModelAdapter)):
            raise TypeError(f"register_adapter needs a ModelAdapter subclass, got {adapter!r}")
        _REGISTRY.insert(0, (predicate, adapter))
        return adapter

    return decorate


def unregister_adapter(adapter: type[ModelAdapter]) -> None:
    """Forget every registration of ``adapter`` (tests; replacing an adapter).

    Example:
        >>> unregister_adapter(ModelAdapter)  # never registered: nothing to do
    """
    _REGISTRY[:] = [(p, a) for p, a in _REGISTRY if a is not adapter]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter describing ``model``: the newest registered one that matches it, else
    the default ``ModelAdapter``.

    Example:
        >>> import torch
        >>> type(adapter_for(torch.nn.Linear(2, 2))).__name__
        'ModelAdapter'
    """
    for predicate, adapter in _REGISTRY:
        if predicate(model):
            return adapter(model)
    return ModelAdapter(model)
