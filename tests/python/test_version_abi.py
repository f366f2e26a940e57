"""Version check at import, library search, and the ctypes struct mirrors
against the real header (compiled with the system C compiler)."""

import ctypes
import os
import shutil
import subprocess
import sys

import pytest

import disco
from disco import _lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")


def _import_in_subprocess(env_lib):
    env = dict(os.environ, DISCO_LIBRARY=env_lib, PYTHONPATH=os.path.join(REPO, "python"))
    return subprocess.run([sys.executable, "-c", "import disco"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_versions_agree():
    assert disco.__version__ == disco.library_version()
    assert os.path.exists(disco.library_path())


def test_check_version_rules():
    _lib.check_version(_lib.VERSION_MAJOR * 10000 + _lib.VERSION_MINOR * 100 + 7, "x")
    with pytest.raises(ImportError, match=r"version 0\.2\.0 but this Python package is 0\.1"):
        _lib.check_version(200, "at /some/libdisco.so")
    with pytest.raises(ImportError, match="same major.minor"):
        _lib.check_version(10100, "x")


def test_missing_library_is_clear_import_error(tmp_path):
    p = _import_in_subprocess(str(tmp_path / "nope.so"))
    assert p.returncode != 0
    assert "ImportError" in p.stderr and "DISCO_LIBRARY" in p.stderr


@needs_cc
def test_version_mismatch_fails_import(tmp_path):
    src = tmp_path / "fake.c"
    src.write_text('int disco_get_version(void) { return 30405; }\n')
    so = tmp_path / "libfake.so"
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    # Missing symbols are reported before the version; give it all of them.
    names = [n for n, _, _ in _lib._SIGNATURES if n != "disco_get_version"]
    src.write_text("int disco_get_version(void) { return 30405; }\n" +
                   "".join(f"void {n}(void) {{}}\n" for n in names))
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    p = _import_in_subprocess(str(so))
    assert p.returncode != 0
    assert "version 3.4.5 but this Python package is 0.1.0" in p.stderr


@needs_cc
def test_struct_mirrors_match_header(tmp_path):
    structs = {"disco_config_t": _lib.Config, "disco_dispatch_args_t": _lib.DispatchArgs,
               "disco_combine_args_t": _lib.CombineArgs}
    lines = []
    for cname, py in structs.items():
        lines.append(f'printf("sizeof {cname} %zu\\n", sizeof({cname}));')
        for field, _ in py._fields_:
            lines.append(f'printf("{cname} {field} %zu\\n", offsetof({cname}, {field}));')
    consts = ["DISCO_STRUCT_VERSION", "DISCO_CONFIG_MAGIC", "DISCO_DISPATCH_ARGS_MAGIC",
              "DISCO_COMBINE_ARGS_MAGIC", "DISCO_DISPATCH_REUSE_LAYOUT", "DISCO_VERSION"]
    lines += [f'printf("const {c} %lld\\n", (long long){c});' for c in consts]
    # The INIT macros' values, field by field, against the Python equivalents.
    inits = {"disco_config_t": "DISCO_CONFIG_INIT",
             "disco_dispatch_args_t": "DISCO_DISPATCH_ARGS_INIT",
             "disco_combine_args_t": "DISCO_COMBINE_ARGS_INIT"}
    for cname, macro in inits.items():
        lines.append(f"{{ {cname} v = {macro};")
        for field, ctype in structs[cname]._fields_:
            lines.append(f'printf("init {cname} {field} %lld\\n", '
                         f'(long long)(intptr_t)v.{field});')
        lines.append("}")
    src = tmp_path / "abi.c"
    src.write_text('#include <stddef.h>\n#include <stdint.h>\n#include <stdio.h>\n'
                   '#include "disco.h"\nint main(void) {\n' + "\n".join(lines) +
                   "\nreturn 0; }\n")
    exe = tmp_path / "abi"
    subprocess.run([CC, "-std=c11", "-I", os.path.join(REPO, "include"), "-o", str(exe),
                    str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    py_inits = {"disco_config_t": _lib.config_init(),
                "disco_dispatch_args_t": _lib.dispatch_args_init(),
                "disco_combine_args_t": _lib.combine_args_init()}
    py_consts = {"DISCO_STRUCT_VERSION": _lib.STRUCT_VERSION,
                 "DISCO_CONFIG_MAGIC": _lib.CONFIG_MAGIC,
                 "DISCO_DISPATCH_ARGS_MAGIC": _lib.DISPATCH_ARGS_MAGIC,
                 "DISCO_COMBINE_ARGS_MAGIC": _lib.COMBINE_ARGS_MAGIC,
                 "DISCO_DISPATCH_REUSE_LAYOUT": _lib.DISPATCH_REUSE_LAYOUT,
                 "DISCO_VERSION": _lib.VERSION_MAJOR * 10000 + _lib.VERSION_MINOR * 100
                 + _lib.VERSION_PATCH}
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "sizeof":
            assert ctypes.sizeof(structs[rest[0]]) == int(rest[1]), line
        elif kind == "const":
            assert py_consts[rest[0]] == int(rest[1]), line
        elif kind == "init":
            cname, field, value = rest
            got = getattr(py_inits[cname], field) or 0
            assert int(got) == int(value), line
        else:
            cname, field, value = kind, rest[0], int(rest[1])
            assert getattr(structs[cname], field).offset == value, line


def test_result_names_match_library():
    lib = _lib.lib()
    for code, name in enumerate(_lib.RESULT_NAMES):
        assert lib.disco_result_name(code).decode() == name
