"""Where things are in the tree.  Every path to a script that the tests
run is here, so that moving a script changes one line."""

import os

T = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(T)
PYTHON = "/usr/bin/python3"

BACKEND = os.path.join(T, "backend.py")
KEYS_TOOL = os.path.join(REPO, "scripts", "anythingllm-keys")
RUN_SCRIPT = os.path.join(REPO, "dev", "run.py")
INSTALL_DEPS = os.path.join(REPO, "dev", "install-deps.sh")
