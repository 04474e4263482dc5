"""The installed distribution is the library alone: a wheel built from the repository holds the package
heinsen_routing and nothing else at the top level (no `data`, `models`, `train`, `glom` of ours in site-packages)."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_only_the_library(tmp_path):
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    [wheel] = tmp_path.glob('heinsen_routing-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split('/')[0] for name in names if not name.split('/')[0].endswith('.dist-info')}
    assert top_level == {'heinsen_routing'}
    assert {'heinsen_routing/routing.py', 'heinsen_routing/streamed.py', 'heinsen_routing/steps.py',
            'heinsen_routing/checks.py', 'heinsen_routing/credit.py'} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
    assert [line for line in metadata.splitlines() if line.startswith('Requires-Dist')] == ['Requires-Dist: torch>=2.4']
