"""Recording what every FFN read from the visual memory, and excluding slots from the read: the two observers.

Why an observer in our own layer code and not a forward hook: a hook on a MemVP layer sees the FFN's input and output,
never the memory activations `a = act(x K^T)` between them (an `FFNMemoryLayer` computes and consumes them inside its
forward; a plain FFN's activations come out of the key layer concatenated with W1's). So each reading layer
(`FFNMemoryLayer`, `ValueMemoryLayer`) calls its `memvp_observer` -- a class-level None, so "off" costs one None check
-- with the scores it keeps (after the read's activation and ADEM-VL's drop, before the dropout) and the values V it
reads them with. `observing(model, observer)` sets that attribute on the model's reading layers for the duration of
a `with` block and deletes it on exit (raised or not): the modules' instance dicts and hooks are then exactly as
before.

* `record_reads(model)` -> a `ReadRecord`: per reading layer and adapter, one `LayerRead` per forward -- the
  activations `a_j` (B, T, n) and the norms `||V_j||` (B, n), so the contribution of slot j to a token's FFN output is
  `|s * a_j| * ||V_j||`. `generate()` makes one forward per step (the prompt, then one token at a time).
* `exclude_slots(model, keep)` reads with `a_j = 0` wherever `keep` (B, n) is False: the slot adds nothing to any
  token of any layer -- the intervention of the deletion/insertion tests (`explain.faithfulness`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from ..tuner.layer import FFNMemoryLayer, MemVPLayer, ValueMemoryLayer


def reading_layers(model: nn.Module) -> list[tuple[str, MemVPLayer]]:
    """(name, layer) of every layer of `model` that reads the memory, in module order (the order of depth): whole-FFN
    wrappers and the value halves of plain FFNs (their key halves only append `x K^T` to W1's output)."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, (FFNMemoryLayer, ValueMemoryLayer))]
    if not found:
        raise ValueError(f"{type(model).__name__} has no MemVP layer: pass a model adapted with a MemVPConfig "
                         "(get_peft_model / PeftModel.from_pretrained).")
    return found


@contextlib.contextmanager
def observing(model: nn.Module, observer) -> Iterator[list[tuple[str, MemVPLayer]]]:
    """Make `observer` the `memvp_observer` of every reading layer of `model` inside the block (module docstring);
    refused when another observer is installed already (two recordings would each see half the truth)."""
    layers = reading_layers(model)
    busy = [name for name, layer in layers if "memvp_observer" in vars(layer)]
    if busy:
        raise ValueError(f"MemVP: {busy[0]} is already observed (record_reads / exclude_slots are not nested).")
    try:
        for _, layer in layers:
            layer.memvp_observer = observer
        yield layers
    finally:
        for _, layer in layers:
            vars(layer).pop("memvp_observer", None)


@dataclass
class LayerRead:
    """One layer's read of one adapter's memory in one forward: `activations` (B, T, n) float32 `a_j` of every token,
    `value_norms` (B, n) `||V_j||`, `scale` the adapter's `s`."""

    layer: int
    adapter: str
    activations: torch.Tensor
    value_norms: torch.Tensor
    scale: float

    def contributions(self) -> torch.Tensor:
        """`|s * a_j| * ||V_j||` (B, T, n): how much slot j moves each token's FFN output."""
        return (self.activations * self.scale).abs() * self.value_norms[:, None, :]


@dataclass
class ReadRecord:
    """What `record_reads` saw: `layer_names` in depth order and every `LayerRead` in the order the layers ran."""

    layer_names: list[str]
    reads: list[LayerRead] = field(default_factory=list)

    def adapters(self) -> list[str]:
        return sorted({read.adapter for read in self.reads})

    def forwards(self, adapter: Optional[str] = None) -> int:
        """How many forwards the record holds (a `generate()`: 1 + the decode steps)."""
        return max((len(self._of(layer, adapter)) for layer in range(len(self.layer_names))), default=0)

    def stacked(self, forward: int = 0, adapter: Optional[str] = None, what: str = "activations") -> torch.Tensor:
        """(L, B, T, n): `what` ('activations' or 'contributions') of every layer in forward `forward`."""
        if what not in ("activations", "contributions"):
            raise ValueError(f"what must be 'activations' or 'contributions', got {what!r}.")
        per_layer = []
        for layer in range(len(self.layer_names)):
            reads = self._of(layer, adapter)
            if forward >= len(reads):
                raise ValueError(f"the record holds {len(reads)} forward(s) of {self.layer_names[layer]}, "
                                 f"not forward {forward}.")
            read = reads[forward]
            per_layer.append(read.activations if what == "activations" else read.contributions())
        return torch.stack(per_layer)

    def _of(self, layer: int, adapter: Optional[str]) -> list[LayerRead]:
        adapter = adapter if adapter is not None else self._only_adapter()
        return [read for read in self.reads if read.layer == layer and read.adapter == adapter]

    def _only_adapter(self) -> str:
        adapters = self.adapters()
        if len(adapters) != 1:
            raise ValueError(f"the record holds the reads of adapters {adapters}: name one (adapter=...).")
        return adapters[0]


class ReadRecorder:
    """The observer of `record_reads`: copies each read's activations and value norms to the CPU, reads unchanged."""

    def __init__(self, record: ReadRecord, index: dict[int, int]) -> None:
        self.record = record
        self.index = index  # id(layer) -> its depth

    def __call__(self, layer: MemVPLayer, adapter_name: str, scores: torch.Tensor,
                 values: torch.Tensor) -> torch.Tensor:
        activations = scores.detach().float()
        norms = values.detach().float().norm(dim=-1)
        norms = norms.expand(activations.shape[0], -1) if norms.dim() == 1 else norms
        self.record.reads.append(LayerRead(self.index[id(layer)], adapter_name, activations.cpu(), norms.cpu(),
                                           float(layer.memvp_scale[adapter_name])))
        return scores


@contextlib.contextmanager
def record_reads(model: nn.Module) -> Iterator[ReadRecord]:
    """`with record_reads(model) as record: model(...)` records every memory read of the block (module docstring).
    Outputs are those of the same call without recording, bit for bit: the recorder reads and returns the scores."""
    record = ReadRecord([name for name, _ in reading_layers(model)])
    recorder = ReadRecorder(record, {})
    with observing(model, recorder) as layers:
        recorder.index.update({id(layer): depth for depth, (_, layer) in enumerate(layers)})
        yield record


class SlotExclusion:
    """The observer of `exclude_slots`: every read's scores times the (B, n) keep mask (generate()'s beams repeat
    each sample in place, so a larger batch takes each row's mask repeated)."""

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep

    def __call__(self, layer: MemVPLayer, adapter_name: str, scores: torch.Tensor,
                 values: torch.Tensor) -> torch.Tensor:
        keep = self.keep.to(device=scores.device)
        if scores.shape[0] != keep.shape[0]:
            keep = keep.repeat_interleave(scores.shape[0] // keep.shape[0], dim=0)
        if keep.shape[-1] != scores.shape[-1]:
            raise ValueError(f"exclude_slots: a keep mask of {keep.shape[-1]} slots for a memory of "
                             f"{scores.shape[-1]} slots.")
        return torch.where(keep[:, None, :], scores, torch.zeros((), dtype=scores.dtype, device=scores.device))


@contextlib.contextmanager
def exclude_slots(model: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Inside the block every read of `model` skips the slots where `keep` (B, n) bool is False: their activation is
    zero, so they add nothing (an empty slot's read, `memory.VisualMemory`'s variable form)."""
    if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"exclude_slots takes a (batch, slots) bool mask, got "
                         f"{getattr(keep, 'dtype', type(keep).__name__)} of shape {tuple(getattr(keep, 'shape', ()))}.")
    with observing(model, SlotExclusion(keep)):
        yield
