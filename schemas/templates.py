"""Templates from recipes (``generation.prompt_template``, ``score.judge.template``) are untrusted
code: :func:`check_template` parses them, refuses attribute or item names that start with ``_``
(the way into Python's internals: ``cycler.__init__.__globals__``), ``include``/``extends``/
``import``, and renders them once with sample values in Jinja2's sandbox (an undefined variable,
a sandbox violation, more than ``MAX_TEMPLATE_CHARS`` of output, more than
``TEMPLATE_RENDER_SECONDS`` of CPU time or more than ``TEMPLATE_RENDER_BYTES`` of memory are
errors naming the field). The stages render them in the sandbox too
(:func:`sandboxed_environment`).

The trial render runs in a child process (``main`` below), not in a thread of
the caller: a render that never ends (a loop of 10^10 steps, a huge power computed in C with the
GIL held) can only be stopped by ending its process. The child has its CPU time and memory
capped (``setrlimit``) and is killed past them; nothing of it outlives the check. A thread could
not be stopped: it went on spinning, holding the GIL, in the process that checked the recipe (a
Prefect worker running deployments, say) for as long as the loop lasted.

Only Jinja2 is imported here (the child starts in about 0.1 s).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

MAX_TEMPLATE_CHARS = 1_000_000  # a recipe template's trial render
TEMPLATE_RENDER_SECONDS = 2.0  # CPU time of the trial render
TEMPLATE_RENDER_BYTES = 1 << 30  # address space of the child that renders (Python and Jinja2 use ~100 MB)
# Wall time the caller waits for the child (start-up included) before it kills it: generous, so that
# a busy machine is not mistaken for a slow template (the CPU limit above is what stops one).
CHILD_WAIT_SECONDS = 60.0
# The child: isolated (-I: no PYTHON* variables, no user site, not the working folder) and told
# where this package is, so that it renders with this very module, installed or not.
_CHILD = [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); from schemas.templates import main; main()"]


def sandboxed_environment(**options: Any):
    """The Jinja2 environment that renders templates: ``ImmutableSandboxedEnvironment`` (no
    attributes starting with ``_``, no mutating methods, bounded ``range``), strict undefined, and
    an unsafe attribute is a ``SecurityError`` at once (Jinja's own sandbox returns an undefined
    value that fails only when used, and ``attr`` chains can hide it)."""
    import jinja2
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str):
            msg = f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
            raise SecurityError(msg)

    return Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, **options)


_SANDBOX = None


def _sandbox():
    global _SANDBOX
    if _SANDBOX is None:
        _SANDBOX = sandboxed_environment(keep_trailing_newline=True)
    return _SANDBOX


def _static_problems(ast) -> str | None:
    from jinja2 import nodes

    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter, nodes.Include, nodes.Extends, nodes.Import, nodes.FromImport)):
        if isinstance(node, (nodes.Include, nodes.Extends, nodes.Import, nodes.FromImport)):
            return f"line {node.lineno}: a template from a recipe cannot include, extend or import other templates"
        name = None
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args and isinstance(node.args[0], nodes.Const):
            name = node.args[0].value
        if isinstance(name, str) and name.startswith("_"):
            return f"line {node.lineno}: attribute '{name}': names starting with '_' are not allowed in templates (they reach Python's internals)"
    return None


def _too_slow(variables: tuple[str, ...]) -> str:
    return f"refused template: it did not finish rendering a sample {'/'.join(variables)} within {TEMPLATE_RENDER_SECONDS:g} s"


@lru_cache(maxsize=256)
def check_template(source: str, variables: tuple[str, ...]) -> None:
    """Refuse a recipe template (ValueError, the message for its field) that does not parse, uses
    names starting with ``_``, includes other templates, or fails a trial render in the sandbox
    with sample values of ``variables`` (an undefined variable, a sandbox violation, too much
    output, too slow, too much memory). The render runs in a child process (see the module's
    docstring)."""
    import jinja2

    env = _sandbox()
    try:
        ast = env.parse(source)
    except jinja2.TemplateSyntaxError as err:
        msg = f"not a valid Jinja2 template: {err}"
        raise ValueError(msg) from None
    except RecursionError:
        msg = "not a valid Jinja2 template: nested too deeply"
        raise ValueError(msg) from None
    problem = _static_problems(ast)
    if problem:
        raise ValueError(f"refused template: {problem}")
    job = json.dumps({"source": source, "variables": list(variables)})
    try:
        child = subprocess.run(_CHILD, input=job, capture_output=True, text=True, timeout=CHILD_WAIT_SECONDS)
    except subprocess.TimeoutExpired:  # run() has killed it
        raise ValueError(_too_slow(variables)) from None
    if child.returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # its CPU limit: a render in C that the timer could not stop
        raise ValueError(_too_slow(variables))
    try:
        outcome = json.loads(child.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        msg = f"the template's trial render failed (exit {child.returncode}): {child.stderr.strip()[-500:]}"
        raise ValueError(msg) from None
    if outcome.get("error"):
        raise ValueError(outcome["error"])


class _TooSlow(Exception):
    pass


def _render_sample(source: str, variables: tuple[str, ...]) -> str | None:
    """In the child: render ``source`` once with sample values, within the limits; the message for
    the field, or ``None`` when it renders."""
    import resource

    from jinja2.exceptions import SecurityError, UndefinedError

    template = _sandbox().from_string(source)
    sample = {name: f"sample {name}" for name in variables}

    def stop(signum, frame):
        raise _TooSlow

    # A timer on this process's CPU time stops a render in Python; one in C (a huge power) does not
    # see the signal until it returns, so the kernel ends the process a second later (RLIMIT_CPU).
    used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    hard = math.ceil(used + TEMPLATE_RENDER_SECONDS) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (hard, hard + 1))
    signal.signal(signal.SIGPROF, stop)
    signal.setitimer(signal.ITIMER_PROF, TEMPLATE_RENDER_SECONDS)
    try:
        size = 0
        for chunk in template.generate(**sample):
            size += len(chunk)
            if size > MAX_TEMPLATE_CHARS:
                return f"refused template: it renders more than {MAX_TEMPLATE_CHARS:,} characters for a sample {'/'.join(variables)}"
        return None
    except _TooSlow:
        return _too_slow(variables)
    except MemoryError:
        return f"refused template: it needs more than {TEMPLATE_RENDER_BYTES >> 20:,} MiB of memory to render a sample {'/'.join(variables)}"
    except SecurityError as err:
        return f"refused template: the sandbox stopped it ({err})"
    except UndefinedError as err:
        return f"the template fails with sample values: {err} (it can use: {', '.join(variables)})"
    except RecursionError:
        return "the template fails with sample values: it recurses too deeply"
    except Exception as err:  # noqa: BLE001 (any failure is the template's)
        return f"the template fails with sample values: {type(err).__name__}: {err}"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


def main() -> None:
    """The child's work: one trial render; the job as JSON on standard input, the outcome
    (``{"error": message or null}``) as JSON on the last line of standard output."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # killed at its CPU limit: no core file
    resource.setrlimit(resource.RLIMIT_AS, (TEMPLATE_RENDER_BYTES, TEMPLATE_RENDER_BYTES))
    job = json.loads(sys.stdin.read())
    error = _render_sample(job["source"], tuple(job["variables"]))
    sys.stdout.write(json.dumps({"error": error}) + "\n")


if __name__ == "__main__":
    main()
