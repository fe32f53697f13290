"""The symbolic tracer of oba_fx: torch.fx's ``Tracer`` with a leaf policy and cheaper hooks.

torch.fx spends most of a trace in its per-module-call and per-node hooks. :class:`LeafTracer`
overrides them with direct versions for the common cases (a Proxy, a plain tuple / list / dict,
a Python scalar as a node argument; a module call; a node made while no preserved-meta context
or stack-trace recording is active) and hands every other case to torch.fx unchanged, so the
graph is the same: same nodes, names, targets, arguments and ``nn_module_stack`` meta.

Example:
    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    >>> g = LeafTracer().trace(m)
    >>> [(n.op, n.target) for n in g.nodes]
    [('placeholder', 'input'), ('call_module', '0'), ('call_module', '1'), ('output', 'output')]
    >>> dict(list(g.nodes)[1].meta["nn_module_stack"])
    {'0': ('0', <class 'torch.nn.modules.linear.Linear'>)}
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.nn as nn
from torch.fx import traceback as fx_traceback
from torch.fx.immutable_collections import immutable_dict
from torch.utils._pytree import tree_map_

#: argument types that a node stores as they are (torch.fx's own rule for them)
_AS_IS = frozenset({str, int, float, bool, complex, type(None), type(...), torch.dtype, torch.device,
                    torch.memory_format, torch.layout})


#: the ops whose arguments ``Graph.create_node`` walks looking for raw SymInts, which a symbolic
#: trace of a module never has (its values are Proxies and Python numbers)
_CALLS = frozenset({"call_function", "call_method", "call_module"})


def append_node(graph: torch.fx.Graph, op: str, target: Any, args: tuple, kwargs: dict,
                name: str | None = None, type_expr: Any | None = None) -> torch.fx.Node:
    """``graph.create_node(op, ...)`` at the graph's insert point, for a graph without an owning
    module (a graph being traced), without the walk over every argument that looks for raw
    SymInts; where this torch's ``Graph`` lacks the internals it uses, ``graph.create_node``.

    Example:
        >>> g = torch.fx.Graph()
        >>> x = g.placeholder("x")
        >>> y = append_node(g, "call_function", torch.relu, (x,), {})
        >>> y.name, y.args, list(x.users)
        ('relu', (x,), [relu])
    """
    if op not in _CALLS or graph.owning_module is not None or not _GRAPH_INTERNALS:
        return graph.create_node(op, target, args, kwargs, name, type_expr)
    if not isinstance(args, tuple):
        raise AssertionError(f"args must be a tuple, got {type(args)}")
    if not isinstance(kwargs, dict):
        raise AssertionError(f"kwargs must be a dict, got {type(kwargs)}")
    namespace = graph._graph_namespace
    if name is None:
        name = _module_name(target) if type(target) is str else graph._target_to_str(target)
    unique = namespace.create_name(name, None)
    node = torch.fx.Node(graph, unique, op, target, args or (), kwargs or immutable_dict(), type_expr)
    namespace.associate_name_with_obj(unique, node)
    graph._insert(node)
    graph._find_nodes_lookup_table.insert(node)
    graph._len += 1
    return node


@functools.lru_cache(maxsize=4096)
def _module_name(target: str) -> str:
    """The name torch.fx gives a node of string target ``target`` before making it unique (its
    snake case), remembered: a model's module paths repeat from trace to trace."""
    return _NAMER._target_to_str(target)


def _has_graph_internals() -> bool:
    """Whether ``torch.fx.Graph`` has the private parts :func:`append_node` uses."""
    g = torch.fx.Graph()
    return all(hasattr(g, a) for a in ("_graph_namespace", "_insert", "_target_to_str",
                                        "_find_nodes_lookup_table", "_len", "owning_module"))


_GRAPH_INTERNALS = _has_graph_internals()
_NAMER = torch.fx.Graph()


class _Scope(torch.fx.proxy.Scope):
    """A tracer's current scope; ``copy.copy`` of it is a direct copy, not the generic
    ``__reduce_ex__`` round trip."""

    def __copy__(self) -> "_Scope":
        return _Scope(self.module_path, self.module_type)


class _ModuleStack(OrderedDict):
    """A tracer's module stack; ``copy.copy`` of it is the plain ``OrderedDict`` that torch.fx
    stores as every node's ``nn_module_stack``, made directly.

    Example:
        >>> import copy
        >>> stack = _ModuleStack(a=("a", int))
        >>> c = copy.copy(stack)
        >>> type(c).__name__, c == stack, c is stack
        ('OrderedDict', True, False)
    """

    def __copy__(self) -> OrderedDict:
        return OrderedDict(self)


@functools.cache
def _tensor_attributes() -> frozenset:
    """Every callable attribute of ``torch.Tensor`` that ``object`` does not give it, and the
    ``__get__`` of every other descriptor: the candidates torch's own
    ``torch.overrides.is_tensor_method_or_property`` checks, taken from ``torch.Tensor`` alone."""
    found = set()
    for name in dir(torch.Tensor):
        f = getattr(torch.Tensor, name)
        if getattr(object, name, None) == f:
            continue
        if callable(f):
            found.add(f)
        elif hasattr(f, "__get__"):
            found.add(f.__get__)
    return frozenset(found)


def is_tensor_method_or_property(func: Any) -> bool:
    """Whether ``func``, as handed to ``__torch_function__``, is a method or property of
    ``torch.Tensor``.

    The same answer as ``torch.overrides.is_tensor_method_or_property`` for every function that
    can reach ``__torch_function__``, without the table of every overridable function of every
    torch namespace that torch builds, once per process, the first time it is asked (about 15 ms,
    as long as a whole trace of a small model). The two differ only on the functions that torch
    lists as not overridable, which never reach ``__torch_function__``.

    Example:
        >>> is_tensor_method_or_property(torch.Tensor.add), is_tensor_method_or_property(torch.add)
        (True, False)
        >>> is_tensor_method_or_property(torch.Tensor.shape.__get__)
        True
    """
    return getattr(func, "__name__", None) == "__get__" or func in _tensor_attributes()


class TracerProxy(torch.fx.Proxy):
    """``torch.fx.Proxy`` whose ``__torch_function__`` tells a Tensor method from a function with
    :func:`is_tensor_method_or_property`; otherwise torch.fx's own (same nodes, same errors)."""

    @classmethod
    def __torch_function__(cls, orig_method, types, args=None, kwargs=None):
        if isinstance(orig_method, (torch._C.ScriptMethod, torch._ops.HigherOrderOperator)):
            return super().__torch_function__(orig_method, types, args, kwargs)
        args = args if args else ()
        kwargs = kwargs if kwargs else {}
        tracers: dict = {}

        def find_tracer(a: Any) -> None:
            if isinstance(a, torch.fx.Proxy):
                tracers[a.tracer] = None

        tree_map_(find_tracer, args)
        tree_map_(find_tracer, kwargs)
        if len(tracers) != 1:  # torch.fx's error
            return super().__torch_function__(orig_method, types, args, kwargs)
        tracer = next(iter(tracers))
        if is_tensor_method_or_property(orig_method):
            return tracer.create_proxy("call_method", orig_method.__name__, args, kwargs)
        return tracer.create_proxy("call_function", orig_method, args, kwargs,
                                   name=tracer.graph._target_to_str(orig_method.__name__))


class LeafTracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` whose leaves are torch.nn's own modules plus the user's choice.

    Args:
        leaf_modules: module classes, or qualified module names, to keep as single calls.
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()) -> None:
        super().__init__()
        self._tensor_index: tuple | None = None  # (root, parameters by id, buffers by id)
        self.scope = _Scope("", None)
        self.module_stack = _ModuleStack()
        leaves = tuple(leaf_modules)
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.leaf_names = {x for x in leaves if isinstance(x, str)}
        self._torch_leaf: dict[type, bool] = {}  # torch.fx's leaf rule, per module class

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        cls = type(m)
        if "__module__" in m.__dict__:  # an instance that names its own module: asked each time
            return super().is_leaf_module(m, qualname)
        leaf = self._torch_leaf.get(cls)
        if leaf is None:
            leaf = self._torch_leaf[cls] = super().is_leaf_module(m, qualname)
        return leaf

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """torch.fx's ``call_module`` (scope, module stack with ``path@n`` keys for repeated
        calls, leaf or traced through) without its scope context manager and scope copy. As in
        torch.fx, a call that raises leaves its module on the stack (the error names it)."""
        path = self.path_of_module(m)
        scope = self.scope
        prev = scope.module_path, scope.module_type
        scope.module_path, scope.module_type = path, type(m)
        try:
            n = self.num_calls.get(path, 0)
            key = f"{path}@{n}" if n > 0 else path
            self.module_stack[key] = (path, type(m))
            self.num_calls[path] = n + 1
            if self.is_leaf_module(m, path):
                out = self.create_proxy("call_module", path, args, kwargs)
            else:
                out = forward(*args, **kwargs)
            last, _ = self.module_stack.popitem(last=True)
            if last != key:
                raise AssertionError(f"Unexpected key {last}, expected {key}")
        finally:
            scope.module_path, scope.module_type = prev
        return out

    def trace(self, root: Any, concrete_args: dict | None = None) -> torch.fx.Graph:
        self._tensor_index = None  # built afresh at the first tensor read of each trace
        return super().trace(root, concrete_args)

    def proxy(self, node: torch.fx.Node) -> TracerProxy:
        return TracerProxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        """torch.fx's rule (a parameter, or with ``proxy_buffer_attributes`` a buffer, of the root
        becomes one ``get_attr`` node under its first qualified name; anything else is itself),
        finding the name in an index of the root's tensors built once per trace instead of a walk
        over every parameter per attribute read; a tensor the index does not know goes to
        torch.fx's own search."""
        if not isinstance(attr_val, torch.Tensor):  # a submodule, a number...: itself
            return attr_val
        name = self._tensor_name(attr_val)
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            factory = ((lambda node: torch.fx.proxy.ParameterProxy(self, node, name, attr_val))
                       if self.param_shapes_constant else None)
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]

    def _tensor_name(self, t: torch.Tensor) -> str | None:
        """The name torch.fx's ``getattr`` gives ``t``: its first name among the root's parameters
        if it is a ``Parameter``, else (with ``proxy_buffer_attributes``) among its buffers; ``None``
        when the index built at the first read of this trace does not know it (or it moved)."""
        root = self.root
        index = self._tensor_index
        if index is None or index[0] is not root:  # the first read of this trace
            params: dict[int, tuple[str, torch.Tensor]] = {}
            for n, p in root.named_parameters():
                params.setdefault(id(p), (n, p))
            buffers: dict[int, tuple[str, torch.Tensor]] = {}
            for n, b in root.named_buffers():
                buffers.setdefault(id(b), (n, b))
            index = self._tensor_index = (root, params, buffers)
        _, params, buffers = index
        found = params.get(id(t)) if isinstance(t, nn.Parameter) else None
        kind = "parameter"
        if found is None and self.proxy_buffer_attributes:
            found, kind = buffers.get(id(t)), "buffer"
        if found is None or found[1] is not t:
            return None
        name = found[0]
        *path, leaf = name.split(".")
        module = root
        for part in path:  # still where the index saw it (read from the tables: getattr is patched now)
            module = module._modules.get(part)
            if module is None:
                return None
        table = module._parameters if kind == "parameter" else module._buffers
        return name if table.get(leaf) is t else None

    def create_arg(self, a: Any) -> Any:
        t = type(a)
        if t in _AS_IS:
            return a
        if t is TracerProxy or t is torch.fx.Proxy:
            return a.node
        if t is tuple:
            return tuple([self.create_arg(x) for x in a])
        if t is list:
            return [self.create_arg(x) for x in a]
        if t is dict and all(type(k) is str for k in a):
            return {k: self.create_arg(v) for k, v in a.items()}
        return super().create_arg(a)

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                    type_expr: Any | None = None) -> torch.fx.Node:
        if (self.record_stack_traces or fx_traceback.has_preserved_node_meta()
                or (kind == "call_function" and self.check_mutable_operations)):
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        node = append_node(self.graph, kind, target, args, kwargs, name, type_expr)
        scope = self.scope
        self.node_name_to_scope[node.name] = (scope.module_path, scope.module_type)
        if self.module_stack:
            node.meta["nn_module_stack"] = OrderedDict(self.module_stack)
        return node

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any | None = None, proxy_factory_fn: Callable | None = None) -> torch.fx.Proxy:
        args_, kwargs_ = self.create_arg(args), self.create_arg(kwargs)
        if not isinstance(args_, tuple):  # torch.fx's own checks
            raise AssertionError(f"Expected args_ to be tuple, got {type(args_)}")
        if not isinstance(kwargs_, dict):
            raise AssertionError(f"Expected kwargs_ to be dict, got {type(kwargs_)}")
        node = self.create_node(kind, target, args_, kwargs_, name, type_expr)
        return proxy_factory_fn(node) if proxy_factory_fn else self.proxy(node)
