"""Helpers for the chat / web / serve tests: free loopback ports and CLI servers that always stop."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def tk_server(args: list, url: str, log_path, timeout: float = 180):
    """Runs ``tk ARGS`` in its own process group until ``url`` answers; stops the group afterwards."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli.main", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"tk {args[0]} exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except urllib.error.HTTPError:
                    break  # it answers (e.g. 401 without a key)
                except OSError:
                    if time.time() > deadline:
                        pytest.fail(f"tk {args[0]} did not answer at {url}:\n{open(log_path).read()[-3000:]}")
                    time.sleep(0.5)
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny random llama with a tk_meta.json naming its template and system prompt, as tk exports do."""
    import shutil
    from toolkit.model.meta import write_meta
    folder = tmp_path_factory.mktemp("tiny_chat") / "tiny-tuned"
    shutil.copytree(tiny_llama_dir, folder)
    write_meta(folder, template="chatml", system="You are tiny.")
    return str(folder)


@pytest.fixture(scope="session")
def servers():
    """``servers.free_port()`` and ``servers.run(args, url, log)`` for tests that start tk servers."""
    import types
    return types.SimpleNamespace(free_port=free_port, run=tk_server)
