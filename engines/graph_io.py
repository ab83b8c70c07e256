"""Input and output names and shapes of an ONNX network, read without starting a runtime."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GraphIO:
    inputs: dict[str, tuple[int | None, ...]]   # None: a dynamic dimension (the batch)
    outputs: dict[str, tuple[int | None, ...]]


def read_io(onnx_path: Path) -> GraphIO:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}

    def shape(v) -> tuple[int | None, ...]:
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)

    return GraphIO(inputs={i.name: shape(i) for i in model.graph.input if i.name not in init},
                   outputs={o.name: shape(o) for o in model.graph.output})
