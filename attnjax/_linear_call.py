"""Batching and JVP rules for ``jax.custom_derivatives.linear_call``, registered on import.

``linear_call(fun, fun_transpose, residuals, linear_args)`` calls a function linear in
``linear_args`` whose transpose is ``fun_transpose``. JAX 0.10 gives its primitive an
evaluation rule, a transpose rule and a JVP rule that requires the residuals to carry no
tangent, but no batching rule. This module registers

- a batching rule: the linear arguments are moved to (or broadcast along) axis 0 and the call
  is bound again with ``fun`` and ``fun_transpose`` vmapped, so ``vmap`` of a ``jax.jvp`` or
  ``jax.grad`` through it works, and the batched call still transposes to the custom
  transpose;
- a JVP rule for residuals that carry tangents (forward-over-reverse second derivatives): the
  output's tangent is the call on the linear arguments' tangents, plus JAX's own JVP of
  ``fun`` with respect to the residuals.

They reach into ``jax._src``: importing this module raises ImportError when the installed JAX
does not have the internals they rely on, rather than letting them go wrong silently.
"""

from __future__ import annotations

import functools

import jax
from jax.extend.core import jaxpr_as_fun

try:
  from jax._src.custom_derivatives import linear_call_p
  from jax._src.interpreters import ad, batching
  _MISSING = [name for module, name in ((ad, "primitive_jvps"), (ad, "Zero"),
                                        (ad, "instantiate_zeros"), (ad, "add_tangents"),
                                        (ad, "p2tz"),
                                        (batching, "fancy_primitive_batchers"),
                                        (batching, "bdim_at_front"))
              if not hasattr(module, name)]
except ImportError as e:
  raise ImportError(f"attnjax needs jax._src.custom_derivatives.linear_call_p and JAX's "
                    f"autodiff and batching internals (as in jax 0.10), got jax "
                    f"{jax.__version__}: {e}") from e
if _MISSING:
  raise ImportError(f"attnjax needs {', '.join(_MISSING)} in jax._src.interpreters (as in jax "
                    f"0.10), missing from jax {jax.__version__}")

_PARAMS = ("callee", "transpose_thunk", "num_callee_consts", "num_res")


def _check_params() -> None:
  """Raises ImportError unless ``linear_call`` binds its primitive with the expected params."""
  jaxpr = jax.make_jaxpr(lambda r, x: jax.custom_derivatives.linear_call(
      lambda r, x: x * r, lambda r, t: t * r, r, x))(1.0, 1.0)
  eqns = [e for e in jaxpr.eqns if e.primitive is linear_call_p]
  if len(eqns) != 1 or sorted(eqns[0].params) != sorted(_PARAMS):
    raise ImportError(f"jax {jax.__version__}'s linear_call does not bind linear_call_p with "
                      f"the params {_PARAMS} that attnjax's rules for it expect")


def _batch(axis_data, args, dims, *, callee, transpose_thunk, num_callee_consts, num_res):
  """vmap rule: the call on batched arguments as a call of the vmapped function."""
  if all(d is None for d in dims):  # Nothing batched: the call as it was.
    out = linear_call_p.bind(*args, callee=callee, transpose_thunk=transpose_thunk,
                             num_callee_consts=num_callee_consts, num_res=num_res)
    return out, [None] * len(out)
  n_fixed = num_callee_consts + num_res
  fixed, fixed_dims = list(args[:n_fixed]), list(dims[:n_fixed])
  mesh_axis = axis_data.explicit_mesh_axis
  lin = [batching.bdim_at_front(x, d, axis_data.size, mesh_axis)
         for x, d in zip(args[n_fixed:], dims[n_fixed:])]
  vmap = functools.partial(jax.vmap, in_axes=(fixed_dims, 0), out_axes=0,
                           axis_size=axis_data.size, axis_name=axis_data.name,
                           spmd_axis_name=axis_data.spmd_name or mesh_axis)

  def fun(fixed, lin):
    return vmap(lambda f, x: jaxpr_as_fun(callee)(*f, *x))(fixed, lin)

  def fun_transpose(fixed, cts):
    transpose, t_consts = transpose_thunk()
    res = lambda f: f[num_callee_consts:]  # noqa: E731  The transpose takes no callee consts.
    return vmap(lambda f, c: jaxpr_as_fun(transpose)(*t_consts, *res(f), *c))(fixed, cts)

  out = jax.custom_derivatives.linear_call(fun, fun_transpose, fixed, lin)
  return out, [0] * len(out)


def _jvp(primals, tangents, *, callee, transpose_thunk, num_callee_consts, num_res):
  """JVP rule: linear in the linear arguments (through the call itself), and JAX's own JVP
  of the callee with respect to the residuals."""
  params = dict(callee=callee, transpose_thunk=transpose_thunk,
                num_callee_consts=num_callee_consts, num_res=num_res)
  n_fixed = num_callee_consts + num_res
  fixed, lin = primals[:n_fixed], primals[n_fixed:]
  t_fixed, t_lin = tangents[:n_fixed], tangents[n_fixed:]
  out = linear_call_p.bind(*primals, **params)
  terms = []
  if any(type(t) is not ad.Zero for t in t_lin):
    terms.append(linear_call_p.bind(*fixed, *map(ad.instantiate_zeros, t_lin), **params))
  moved = [i for i, t in enumerate(t_fixed) if type(t) is not ad.Zero]
  if moved:
    def of_moved(*xs):
      f = list(fixed)
      for i, x in zip(moved, xs):
        f[i] = x
      return jaxpr_as_fun(callee)(*f, *lin)
    terms.append(jax.jvp(of_moved, [fixed[i] for i in moved], [t_fixed[i] for i in moved])[1])
  if not terms:
    return out, [ad.p2tz(o) for o in out]
  return out, functools.reduce(lambda a, b: list(map(ad.add_tangents, a, b)), terms)


_check_params()
batching.fancy_primitive_batchers[linear_call_p] = _batch
ad.primitive_jvps[linear_call_p] = _jvp
