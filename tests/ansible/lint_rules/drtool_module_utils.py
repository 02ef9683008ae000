"""ansible-lint plugin: lets the ``args`` rule load drtool's modules.

Ansible ships ``roles/drtool_common/module_utils/drtool_common.py`` inside each
module's payload as ``ansible.module_utils.drtool_common``.  ansible-lint's
``args`` rule instead imports the module file in its own process, where that name
does not exist, and so skips checking the options our tasks pass.  Registering the
file under that name here (this plugin is imported before any rule runs) lets the
rule check every drtool module call in the roles and playbooks.  It adds no rule.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ansiblelint.rules import AnsibleLintRule

_NAME = "ansible.module_utils.drtool_common"
_PATH = Path(__file__).resolve().parents[3] / "roles" / "drtool_common" / "module_utils" / "drtool_common.py"

if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)


class DrtoolModuleUtilsRule(AnsibleLintRule):
    """drtool's module_utils are importable by the args rule (never reports anything)."""

    id = "drtool-module-utils"
    description = __doc__
    severity = "INFO"
    tags = ["drtool"]
    version_changed = "25.0.0"
