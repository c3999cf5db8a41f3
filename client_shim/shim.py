"""The file kubectl runs: ``/abs/python3 -I -S /abs/path/client_shim/shim.py get-token ...``.

A script is compiled from source on every run; a module imported from a package comes from its cached bytecode.
So this launcher stays tiny and the shim itself lives in client_shim/core.py (about 4 ms less per kubectl call).
``-I`` leaves the script's directory off sys.path, hence the explicit entry for the directory above this package.
"""

if __name__ == "__main__":
    import sys

    sys.path.append(__file__.rpartition("/")[0].rpartition("/")[0] or "/")  # /client_shim/shim.py: "/", never ""
    from client_shim.core import run

    run()
