"""The sandbox runs ordinary programs and refuses files, network, processes and FFI, with limits."""

import os
import time
import uuid

import pytest

from distillery.sandbox import network_namespace_available, run_python


def test_prints_a_result():
    result = run_python("print(2 + 2)")
    assert result.ok
    assert result.reason is None and result.detail is None
    assert result.stdout.strip() == "4"
    assert result.seconds > 0


def test_reading_a_system_file_is_forbidden():
    result = run_python("print(open('/etc/passwd').read())")
    assert not result.ok
    assert result.reason == "forbidden"
    assert "/etc/passwd" in result.detail
    assert "root:" not in result.stdout


def test_files_inside_the_scratch_directory_work():
    code = "with open('notes.txt', 'w') as f:\n    f.write('kept 7')\nprint(open('notes.txt').read())"
    result = run_python(code)
    assert result.ok, result.detail
    assert result.stdout.strip() == "kept 7"


def test_each_run_gets_a_fresh_scratch_directory_that_is_deleted():
    first = run_python("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())")
    scratch = first.stdout.strip()
    assert first.ok and scratch
    assert not os.path.exists(scratch)  # deleted after the run
    second = run_python("import os\nprint(sorted(os.listdir('.')))")
    assert second.stdout.strip() == "[]"  # nothing of the first run is there


def test_writing_outside_the_scratch_directory_is_forbidden():
    target = f"/tmp/escape-{uuid.uuid4().hex}.txt"
    result = run_python(f"open({target!r}, 'w').write('out')\nprint('written')")
    assert result.reason == "forbidden"
    assert target in result.detail
    assert not os.path.exists(target)


def test_a_refusal_the_program_catches_still_counts():
    code = "try:\n    open('/etc/hostname').read()\nexcept OSError:\n    pass\nprint(5)"
    result = run_python(code)
    assert result.reason == "forbidden"
    assert "/etc/hostname" in result.detail


def test_removing_files_outside_scratch_is_forbidden(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    result = run_python(f"import os\nos.remove({str(victim)!r})\nprint('gone')")
    assert result.reason == "forbidden"
    assert "os.remove" in result.detail
    assert victim.read_text() == "keep me"


def test_network_is_forbidden():
    result = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))\nprint('connected')")
    assert result.reason == "forbidden"
    assert result.detail.startswith("socket.")
    assert "connected" not in result.stdout


@pytest.mark.skipif(not network_namespace_available(), reason="unshare --net does not work here")
def test_the_child_has_its_own_network_namespace():
    result = run_python("import os, socket\nprint(os.readlink('/proc/self/ns/net'))\nprint(socket.if_nameindex())")
    assert result.ok, result.detail
    namespace, interfaces = result.stdout.strip().splitlines()
    assert namespace != os.readlink("/proc/self/ns/net")
    assert interfaces == "[(1, 'lo')]"


def test_subprocesses_are_forbidden():
    result = run_python("import subprocess\nsubprocess.run(['ls'])\nprint('ran')")
    assert result.reason == "forbidden"
    assert "subprocess.Popen" in result.detail
    assert result.stdout == ""


@pytest.mark.parametrize("code", ["import os\nos.system('true')", "import os\nos.fork()", "import os\nos.kill(os.getppid(), 0)"])
def test_process_calls_are_forbidden(code):
    assert run_python(code).reason == "forbidden"


def test_an_infinite_loop_times_out():
    start = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1)
    elapsed = time.monotonic() - start
    assert result.reason == "timeout"
    assert elapsed < 3
    assert result.seconds < 3


def test_a_huge_allocation_hits_the_memory_limit():
    result = run_python("x = bytearray(2 * 1024 ** 3)\nprint(len(x))", memory_mb=256)
    assert result.reason == "memory_limit"
    assert result.stdout == ""


def test_ctypes_is_forbidden():
    result = run_python("import ctypes\nprint(ctypes.CDLL(None))")
    assert result.reason == "forbidden"
    assert "ctypes" in result.detail


def test_ctypes_is_forbidden_even_after_a_library_loaded_it():
    result = run_python("import sympy\nimport ctypes\nprint('loaded')")  # sympy imports ctypes itself
    assert result.reason == "forbidden"
    assert "ctypes" in result.detail


def test_an_exception_is_an_error_with_the_last_traceback_line():
    result = run_python("print('before')\n1 / 0")
    assert result.reason == "error"
    assert "ZeroDivisionError" in result.detail
    assert "ZeroDivisionError" in result.stderr
    assert result.stdout.strip() == "before"


def test_a_nonzero_exit_is_an_error_and_exit_zero_is_fine():
    assert run_python("print(1)\nimport sys\nsys.exit(3)").reason == "error"
    assert run_python("print(1)\nimport sys\nsys.exit(0)").ok


def test_a_program_that_prints_nothing_has_no_output():
    result = run_python("x = 6 * 7")
    assert not result.ok
    assert result.reason == "no_output"


def test_standard_library_and_sympy_imports_work():
    result = run_python("import fractions, math\nprint(fractions.Fraction(1, 3) + fractions.Fraction(1, 6), math.comb(5, 2))")
    assert result.ok, result.detail
    assert result.stdout.strip() == "1/2 10"
    result = run_python("import sympy\nx = sympy.Symbol('x')\nprint(sympy.solve(x**2 - 9, x))")
    assert result.ok, result.detail
    assert result.stdout.strip() == "[-3, 3]"


def test_stdin_reaches_the_program():
    result = run_python("print(int(input()) * 2)", stdin="21\n")
    assert result.stdout.strip() == "42"


def test_output_is_truncated_but_keeps_its_end():
    result = run_python("for i in range(100000):\n    print(i)")
    assert result.ok
    assert len(result.stdout) < 70 * 1024
    assert "bytes cut" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "99999"
