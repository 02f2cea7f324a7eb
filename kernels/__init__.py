"""Triton kernels shared by the NVIDIA and ROCm backends, each beside its pure-torch reference.

One module per op family (``quant``, ``gemm``, ``grouped_gemm``, ``mla_decode``, ``prefill``, ``moe``,
``fused``). Every module follows one convention (see :mod:`hal_kernels._common`):

- ``@triton.jit`` kernels, and for each a *launcher*: a plain Python function whose signature is the
  catalogue op's (``hal.ops.catalogue``) plus a keyword-only ``config`` (block sizes, warps, stages;
  ``None`` means the module's default). The launcher checks what the kernel itself needs (device,
  contiguity, alignment) and raises :class:`hal.errors.OpInputError` naming the argument.
- ``OPS``: catalogue op name → launcher. A backend registers these as its op implementations, with the
  config for its architecture bound from its own tuning files.
- ``DEFAULTS``: catalogue op name → its default config, the keys its launcher takes (a tuning file's
  keys are checked against it when a backend binds them).
- ``REFERENCE``: catalogue op name → ``"module:function"`` of the oracle the tests compare against (the
  CPU backend's reference op). Kernels never import backends; the name is resolved by the tests.
- ``compile_specs(fp8, config)``: the :class:`~hal_kernels._common.CompileSpec` list that
  ``hal compile-check`` compiles for a GPU target without a GPU. A launcher and the specs get a
  kernel's pointer types, ``constexpr`` values, warps and stages from one function of the dtypes and
  flags (a :class:`~hal_kernels._common.Launch`): the launcher calls it, the specs compile it, so what is
  compiled is what is launched.

The kernels are tested on the CPU under ``TRITON_INTERPRET=1``, which must be set before this package
is imported (tests/conftest.py does so); compiling for real targets needs it unset (compile-check runs
in its own process).
"""

#: the kernel modules, in the order ``hal compile-check`` reports them.
MODULES = ("quant", "gemm", "grouped_gemm", "mla_decode", "prefill", "moe", "fused")
