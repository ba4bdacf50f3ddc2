"""Read a TensorFlow frozen graph (GraphDef) without TensorFlow.

The face detector's weights ship only as a TF 2 frozen graph. Pulling in TensorFlow (1.3 GB) or
tensorboard's generated classes to read 6.6 MB is not worth it: the few messages a GraphDef needs
(GraphDef, NodeDef, AttrValue, TensorProto, TensorShapeProto) are declared here with protobuf's
descriptor API, field numbers as in tensorflow/core/framework/*.proto, and parsed by protobuf
itself (the `protobuf` dependency onnxruntime already needs). Unknown fields (function library,
versions, resource handles) are skipped by protobuf's parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

# DataType enum values (tensorflow/core/framework/types.proto) -> numpy dtypes.
TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 9: np.int64, 10: np.bool_}

_OPT, _REP = 1, 3  # FieldDescriptorProto labels
_FIELD_TYPES = {"double": 1, "float": 2, "int64": 3, "int32": 5, "bool": 8, "string": 9,
                "message": 11, "bytes": 12, "enum": 14}  # fmt: skip

# (message, [(name, number, type, label, message type, packed)])
_MESSAGES = [
    ("Dim", [("size", 1, "int64", _OPT, None), ("name", 2, "string", _OPT, None)]),
    ("TensorShapeProto", [("dim", 2, "message", _REP, "Dim"),
                          ("unknown_rank", 3, "bool", _OPT, None)]),
    ("TensorProto", [("dtype", 1, "int32", _OPT, None),
                     ("tensor_shape", 2, "message", _OPT, "TensorShapeProto"),
                     ("tensor_content", 4, "bytes", _OPT, None),
                     ("float_val", 5, "float", _REP, None),
                     ("double_val", 6, "double", _REP, None),
                     ("int_val", 7, "int32", _REP, None),
                     ("int64_val", 10, "int64", _REP, None),
                     ("bool_val", 11, "bool", _REP, None)]),
    ("ListValue", [("s", 2, "bytes", _REP, None), ("i", 3, "int64", _REP, None),
                   ("f", 4, "float", _REP, None), ("b", 5, "bool", _REP, None),
                   ("type", 6, "int32", _REP, None),
                   ("shape", 7, "message", _REP, "TensorShapeProto"),
                   ("tensor", 8, "message", _REP, "TensorProto")]),
    ("AttrValue", [("list", 1, "message", _OPT, "ListValue"), ("s", 2, "bytes", _OPT, None),
                   ("i", 3, "int64", _OPT, None), ("f", 4, "float", _OPT, None),
                   ("b", 5, "bool", _OPT, None), ("type", 6, "int32", _OPT, None),
                   ("shape", 7, "message", _OPT, "TensorShapeProto"),
                   ("tensor", 8, "message", _OPT, "TensorProto")]),
    ("AttrEntry", [("key", 1, "string", _OPT, None), ("value", 2, "message", _OPT, "AttrValue")]),
    ("NodeDef", [("name", 1, "string", _OPT, None), ("op", 2, "string", _OPT, None),
                 ("input", 3, "string", _REP, None), ("device", 4, "string", _OPT, None),
                 ("attr", 5, "message", _REP, "AttrEntry")]),
    ("GraphDef", [("node", 1, "message", _REP, "NodeDef")]),
]  # fmt: skip


@lru_cache(maxsize=1)
def _graph_def_class() -> type:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    package = "sa_engine_tf_subset"
    proto = descriptor_pb2.FileDescriptorProto(
        name="sa_engine_tf_subset.proto", package=package, syntax="proto3"
    )
    for name, fields in _MESSAGES:
        message = proto.message_type.add(name=name)
        if name == "AttrValue":  # AttrValue's fields form the oneof `value`
            message.oneof_decl.add(name="value")
        for fname, number, ftype, label, type_name in fields:
            field = message.field.add(
                name=fname, number=number, type=_FIELD_TYPES[ftype], label=label
            )
            if type_name:
                field.type_name = f".{package}.{type_name}"
            if name == "AttrValue":
                field.oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.GraphDef"))


@dataclass(frozen=True)
class Node:
    """One graph node: `inputs` are node names (`^ctrl` dependencies dropped, `:k` kept)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any]


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """A TensorProto to a numpy array (tensor_content or the typed *_val fields, broadcast)."""
    dtype = TF_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"TensorProto dtype {tensor.dtype} is not supported")
    shape = [d.size for d in tensor.tensor_shape.dim]
    if tensor.tensor_content:
        return np.frombuffer(tensor.tensor_content, dtype=dtype).reshape(shape).copy()
    for values in (tensor.float_val, tensor.double_val, tensor.int_val, tensor.int64_val,
                   tensor.bool_val):  # fmt: skip
        if len(values):
            flat = np.asarray(list(values), dtype=dtype)
            count = int(np.prod(shape)) if shape else 1
            return (np.broadcast_to(flat[-1:], (count,)) if flat.size == 1 else flat).reshape(
                shape
            ).copy()
    return np.zeros(shape, dtype=dtype)


def _attr_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "tensor":
        return tensor_to_numpy(value.tensor)
    if kind == "list":
        lst = value.list
        for name in ("i", "f", "s", "b", "type"):
            items = list(getattr(lst, name))
            if items:
                return [v.decode() if isinstance(v, bytes) else v for v in items]
        return []
    if kind == "shape":
        return [d.size for d in value.shape.dim]
    if kind is None:
        return None
    v = getattr(value, kind)
    return v.decode(errors="replace") if isinstance(v, bytes) else v


def read_graph(path: str | Path) -> dict[str, Node]:
    """Parse a frozen GraphDef file into {node name: Node}, attribute values decoded.

    Raises:
      ValueError: the file is missing or is not a GraphDef.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: frozen graph not found")
    graph = _graph_def_class()()
    try:
        graph.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise ValueError(f"{path}: not a TensorFlow GraphDef ({exc})") from None
    nodes = {}
    for n in graph.node:
        attrs = {entry.key: _attr_value(entry.value) for entry in n.attr}
        inputs = tuple(i for i in n.input if not i.startswith("^"))
        nodes[n.name] = Node(n.name, n.op, inputs, attrs)
    if not nodes:
        raise ValueError(f"{path}: the GraphDef has no nodes")
    return nodes
