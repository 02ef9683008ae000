"""Stand-in for ansible-test's pip bootstrap script (get-pip.py), from a pip already on this machine.

ansible-test sanity runs each test in a virtual environment of its own, created without pip, and
installs pip into it with a get-pip.py it downloads from ci-files.testing.ansible.com, or takes
from ``~/.ansible/test/cache/get_pip_<version>.py`` when that file exists.  That host is one more
network dependency (it is not reachable from every CI machine, nor from this project's), while
the pinned pip and the sanity requirements come from the package index anyway.  So
tests/ansible/test_collection.py puts this file in that cache, under a private HOME: it does what
get-pip.py does, run ``pip install`` with the arguments given (here ``pip==24.2``), with a pip
found here, and drops the two get-pip-only options.

The pip it runs: the one of the venv that runs the tests, whose site-packages directory the test
writes into ``pip-site.txt`` next to this file; else the wheel bundled with the standard
library's ensurepip (``ensurepip/_bundled``; Debian keeps it in ``/usr/share/python-wheels``).
"""

import glob
import os
import sys

import ensurepip

here = os.path.dirname(os.path.abspath(__file__))
candidates = []
try:
    with open(os.path.join(here, "pip-site.txt"), encoding="utf-8") as handle:
        candidates.append(handle.read().strip())
except OSError:
    pass
candidates += sorted(glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled", "pip-*.whl")))
candidates += sorted(glob.glob("/usr/share/python-wheels/pip-*.whl"))
candidates = [path for path in candidates if os.path.exists(path)]
if not candidates:
    sys.exit("no pip to bootstrap with: no pip-site.txt, and ensurepip has no bundled pip wheel")
sys.path.insert(0, candidates[0])

from pip._internal.cli.main import main  # noqa: E402  (importable only from the path above)

arguments = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
sys.exit(main(["install", *arguments]))
