"""Small FX helpers shared by export and the transforms."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

EXPORT_ROOT = "model"  # the attribute under which export.LogitsOnly holds the user's model


def owning_module(node: Node) -> str:
    """Path of the innermost module that produced ``node``, relative to the user's model.

    "" for the model itself or when unknown.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if path == EXPORT_ROOT:
        return ""
    return path[len(EXPORT_ROOT) + 1:] if path.startswith(EXPORT_ROOT + ".") else path


def op_kwargs(node: Node) -> dict[str, Any]:
    """All arguments of an OpOverload call by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def is_op(node: Any, *targets) -> bool:
    """``node`` is a call to one of ``targets`` (anything else, constants included, is not)."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def op_nodes(gm: torch.fx.GraphModule, target) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def placeholder_names(gm: torch.fx.GraphModule) -> list[str]:
    """The graph's input names, in call order."""
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def graph_input(gm: torch.fx.GraphModule, name: str) -> Node:
    """The placeholder called ``name``, added after the last placeholder if missing."""
    last = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.target == name:
                return node
            last = node
    with gm.graph.inserting_after(last) if last is not None else gm.graph.inserting_before(None):
        return gm.graph.placeholder(name)


def attr_value(gm: torch.fx.GraphModule, target: str) -> Any:
    """What a get_attr node with ``target`` reads (a parameter, buffer or plain attribute)."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def move_graph_module(gm: torch.fx.GraphModule, device: torch.device | str) -> None:
    """Move a graph built on another device: every tensor a get_attr reads (parameters, buffers and
    plain tensor attributes alike) and every device argument baked into a node (``to(device=...)``,
    factory ops) now name ``device``. Used to build a tensor-parallel rank's graph on the host and
    ship only its shard to the GPU."""
    device = torch.device(device)
    gm.to(device)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = attr_value(gm, node.target)
            if isinstance(value, torch.Tensor) and value.device != device and not isinstance(value, torch.nn.Parameter):
                *path, leaf = node.target.split(".")  # a plain tensor attribute: gm.to() does not move it
                setattr(gm.get_submodule(".".join(path)) if path else gm, leaf, value.to(device))
        elif node.op == "call_function":
            node.args = tuple(device if isinstance(a, torch.device) else a for a in node.args)
            node.kwargs = {k: device if isinstance(v, torch.device) else v for k, v in node.kwargs.items()}
    gm.recompile()


def ancestors(node: Node) -> set[Node]:
    """``node`` and every node it depends on."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def subgraph_module(gm: torch.fx.GraphModule, out: Node) -> tuple[torch.fx.GraphModule, list[Node]]:
    """A module computing ``out`` from its ancestors in ``gm`` alone, and the placeholders of
    ``gm`` it takes, in order (to evaluate a node on probe inputs: masks, tables)."""
    needed, graph, env = ancestors(out), torch.fx.Graph(), {}
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[out])
    return torch.fx.GraphModule(gm, graph), [n for n in gm.graph.nodes if n.op == "placeholder" and n in needed]
