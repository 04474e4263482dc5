"""The installed distribution: a wheel built from the repository holds the library heinsen_routing and the harness's
package heinsen_replication, and nothing else at the top level (no `data`, `models`, `train` of ours in
site-packages)."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_library_and_the_harness_package_only(tmp_path):
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    [wheel] = tmp_path.glob('heinsen_routing-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split('/')[0] for name in names if not name.split('/')[0].endswith('.dist-info')}
    assert top_level == {'heinsen_routing', 'heinsen_replication'}
    assert {'heinsen_routing/routing.py', 'heinsen_routing/streamed.py', 'heinsen_routing/steps.py',
            'heinsen_routing/checks.py', 'heinsen_routing/credit.py', 'heinsen_replication/models.py',
            'heinsen_replication/data/__init__.py'} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith('Requires-Dist')]
    assert [line for line in requires if 'extra ==' not in line] == ['Requires-Dist: torch>=2.4']   # the library's
    assert {line.split('; ')[-1] for line in requires if 'extra ==' in line} == \
        {'extra == "harness"', 'extra == "notebooks"', 'extra == "tests"'}
    assert 'Requires-Dist: tensorboard==2.21.0; extra == "harness"' in requires
    for field in ('Author: ', 'License-Expression: MIT', 'Project-URL: ', 'Classifier: ', 'Requires-Python: '):
        assert field in metadata, field
