"""`python -m lingshu_fast._native_check`: says whether the native CPU helpers (lingshu_fast._C) are built."""
try:
    from lingshu_fast import _C  # noqa: F401

    print("lingshu_fast: native helpers (lingshu_fast._C) are built")
except ImportError as err:
    print(f"lingshu_fast: native helpers not built ({err}); using the numpy paths")
