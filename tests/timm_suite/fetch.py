"""Put timm's ``tests/test_models.py`` for the installed timm version next to this file.

timm's wheel has no tests; its sdist does. The file is downloaded at test time and git-ignored, so no
timm code lives in this repository. When the download is impossible the reason is recorded and the
suite is reported as skipped (``test_timm_suite_available``).
"""
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
TARGET = HERE / 'test_models.py'
REASON = HERE.parent.parent / '.cache' / 'timm_suite_unavailable.txt'


def fetch_timm_model_tests() -> bool:
    import timm
    version = timm.__version__
    stamp = f'# timm {version}\n'
    if TARGET.exists() and TARGET.read_text().startswith(stamp):
        return True
    REASON.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
               f'timm=={version}', '-d', tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        sdists = list(pathlib.Path(tmp).glob('timm-*.tar.gz'))
        if proc.returncode != 0 or not sdists:
            REASON.write_text(f'could not download the timm {version} sdist: {proc.stderr.strip()[-500:]}')
            return False
        member = f'timm-{version}/tests/test_models.py'
        with tarfile.open(sdists[0]) as tar:
            try:
                text = tar.extractfile(member).read().decode()
            except KeyError:
                REASON.write_text(f'the timm {version} sdist has no {member}')
                return False
    tmp_target = TARGET.with_suffix('.tmp')
    tmp_target.write_text(stamp + text)
    os.replace(tmp_target, TARGET)
    if REASON.exists():
        REASON.unlink()
    return True


if __name__ == '__main__':
    sys.exit(0 if fetch_timm_model_tests() else 1)
