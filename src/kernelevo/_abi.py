"""Loading the compiled extension, failing loudly when it does not fit the installed MLX.

The extension is compiled against one MLX release and must share mlx.core's nanobind ABI.
A mismatch would otherwise import fine and then fail every call with "incompatible
function arguments"; here it fails at import with what to install instead.
"""

from __future__ import annotations

REINSTALL = "pip install --force-reinstall --no-cache-dir kernelevo (or `pip install .` from a checkout)"


def load_extension():
    import mlx.core as mx  # must be imported before the extension: it registers the array type

    try:
        from . import _ext
    except ImportError as err:
        raise ImportError(f"kernelevo's compiled extension could not be loaded: {err}. "
                          f"Reinstall it against the installed MLX {mx.__version__}: {REINSTALL}") from err
    info = _ext.build_info()
    built, runtime = info["mlx_version_built"], info["mlx_version"]
    if mx.__version__ != built or runtime != built:
        raise ImportError(
            f"kernelevo was built against MLX {built}, but the installed mlx is {mx.__version__} "
            f"(its libmlx is {runtime}). Install the matching MLX: pip install mlx=={built} "
            f"mlx-cpu=={built} (Linux) or mlx-metal=={built} (macOS), or rebuild kernelevo for "
            f"the MLX you have: {REINSTALL}")
    try:
        _ext.abi_probe(mx.array(0))
    except TypeError as err:
        raise ImportError(
            f"kernelevo's extension cannot read mlx.core arrays: it was built with nanobind "
            f"{info['nanobind_version']}, whose ABI differs from the one mlx {mx.__version__} "
            f"uses. Rebuild with nanobind==3.1.0: {REINSTALL}") from err
    return _ext
