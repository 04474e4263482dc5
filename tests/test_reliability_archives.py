"""Archives cannot write outside their destination, by design (data.extract_archive, used by
data.download_and_extract): link, device and fifo members are refused outright, every member path is checked
against the resolved destination, and everything is unpacked into a fresh folder that is renamed into place.
Each hostile archive is checked twice: it does escape a plain extraction (so the test reproduces a real
attack), and it is refused here, on this Python and on one without tarfile.data_filter."""
import io
import os
import stat
import tarfile
import zipfile

import pytest

from heinsen_replication import data


def sha256(path):
    return 'sha256:' + data.file_checksum(str(path))


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


def add_link(t, name, target, hard=False):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    t.addfile(info)


def add_dir(t, name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    t.addfile(info)


def add_file(t, name, payload=b'escaped'):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    t.addfile(info, io.BytesIO(payload))


def dotdot_chain_tar(path, levels=2):
    """a/l0 -> '..', a/l0/l1 -> '..', ...: every link and its target look inside lexically, but each link is
    made through the previous one, so the chain climbs one folder per link; then a file is written through it."""
    with tarfile.open(path, 'w') as t:
        add_dir(t, 'a')
        name = 'a/l0'
        add_link(t, name, '..')
        for k in range(1, levels + 1):
            name = f'{name}/l{k}'
            add_link(t, name, '..')
        add_file(t, f'{name}/escaped.txt')


def long_chain_tar(path, escape_levels=2):
    """Links whose targets each stay inside, but whose expansion is longer than PATH_MAX, so os.path.realpath
    stops resolving them and tarfile's data filter (Python 3.11.7 and others) lets the last link climb out."""
    comp, steps, prefix = 'd' * 247, 'abcdefghijklmnop', ''
    with tarfile.open(path, 'w') as t:
        for s in steps:
            add_dir(t, os.path.join(prefix, comp))
            add_link(t, os.path.join(prefix, s), comp)
            prefix = os.path.join(prefix, comp)
        deep = os.path.join(*steps, 'l' * 254)
        add_link(t, deep, '../' * len(steps))
        add_link(t, 'escape', deep + '/' + '../' * escape_levels)
        add_file(t, 'escape/escaped.txt')


@pytest.fixture(params=['with data_filter', 'without data_filter'])
def python(request, monkeypatch):
    """This Python, and one without tarfile.data_filter (as Python 3.10.0-3.10.11 and 3.11.0-3.11.3)."""
    if request.param == 'without data_filter':
        monkeypatch.delattr(tarfile, 'data_filter', raising=False)
    return request.param


def assert_refused_and_nothing_written(tmp_path, archive, match):
    before = files_under(tmp_path)
    dest = tmp_path / 'x' / 'y' / 'z' / 'dest'
    with pytest.raises(data.UnsafeArchiveError, match=match):
        data.download_and_extract(archive.as_uri(), str(dest), checksum=sha256(archive))
    assert files_under(tmp_path) == before                                       # nothing written anywhere
    assert os.listdir(dest) == [] and os.listdir(dest.parent) == ['dest']        # no temporary folder left


def test_chain_of_dotdot_links_escapes_a_plain_extraction(tmp_path):
    archive = tmp_path / 'chain.tar'
    dotdot_chain_tar(archive)
    dest = tmp_path / 'x' / 'y' / 'z' / 'dest'
    dest.mkdir(parents=True)
    with tarfile.open(archive) as t:
        t.extractall(dest, filter='fully_trusted')                               # what Pythons without the filter do
    assert (tmp_path / 'x' / 'y' / 'escaped.txt').exists()


def test_chain_of_dotdot_links_is_refused(tmp_path, python):
    archive = tmp_path / 'chain.tar'
    dotdot_chain_tar(archive)
    assert_refused_and_nothing_written(tmp_path, archive, r"'a/l0' is a symbolic link")


def test_link_chain_longer_than_realpath_resolves_escapes_the_data_filter(tmp_path):
    archive = tmp_path / 'long.tar'
    long_chain_tar(archive)
    dest = tmp_path / 'x' / 'y' / 'dest'
    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive) as t:
            t.extractall(dest, filter='data')
    except tarfile.FilterError:
        pytest.skip("this Python's tarfile data filter refuses the long link chain (fixed upstream)")
    assert (tmp_path / 'x' / 'escaped.txt').exists()


def test_link_chain_longer_than_realpath_resolves_is_refused(tmp_path, python):
    archive = tmp_path / 'long.tar'
    long_chain_tar(archive)
    assert_refused_and_nothing_written(tmp_path, archive, 'is a symbolic link')


@pytest.mark.parametrize('kind', ['symlink inside', 'hardlink', 'fifo', 'char device'])
def test_link_device_and_fifo_members_are_refused(tmp_path, python, kind):
    """Even a link that points inside: no official archive holds any link, device or fifo."""
    archive = tmp_path / 'a.tar.gz'
    with tarfile.open(archive, 'w:gz') as t:
        add_file(t, 'ok/fine.txt', b'ok')
        if kind == 'symlink inside':
            add_link(t, 'ok/link', 'fine.txt')
        elif kind == 'hardlink':
            add_link(t, 'ok/link', 'ok/fine.txt', hard=True)
        else:
            info = tarfile.TarInfo('ok/special')
            info.type = tarfile.FIFOTYPE if kind == 'fifo' else tarfile.CHRTYPE
            t.addfile(info)
    match = 'hard link' if kind == 'hardlink' else 'symbolic link' if kind == 'symlink inside' else 'device, fifo'
    assert_refused_and_nothing_written(tmp_path, archive, match)


@pytest.mark.parametrize('name', ['../escaped.txt', 'ok/../../escaped.txt', '/tmp/escaped-abs.txt',
                                  'C:/escaped.txt', '..\\escaped.txt'])
def test_member_paths_outside_are_refused(tmp_path, python, name):
    archive = tmp_path / 'a.tar'
    with tarfile.open(archive, 'w') as t:
        add_file(t, 'ok/fine.txt', b'ok')
        add_file(t, name)
    assert_refused_and_nothing_written(tmp_path, archive, 'outside')
    assert not os.path.exists('/tmp/escaped-abs.txt')


def test_zip_links_devices_and_paths_outside_are_refused(tmp_path):
    """zipfile's own extractall would silently rename '../x' to 'x' and write a link member as a plain file."""
    for k, (name, mode, match) in enumerate([('ok/link', stat.S_IFLNK | 0o777, 'symbolic link'),
                                             ('ok/fifo', stat.S_IFIFO | 0o644, 'device, fifo'),
                                             ('../escaped.txt', stat.S_IFREG | 0o644, 'outside'),
                                             ('/abs/escaped.txt', stat.S_IFREG | 0o644, 'outside')]):
        archive = tmp_path / f'a{k}.zip'
        with zipfile.ZipFile(archive, 'w') as z:
            z.writestr('ok/fine.txt', b'ok')
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            z.writestr(info, b'../../escaped')
        assert_refused_and_nothing_written(tmp_path, archive, match)


def test_member_twice_or_file_and_folder_is_refused(tmp_path):
    for k, second in enumerate(['ok/fine.txt', 'ok/fine.txt/inner.txt']):
        archive = tmp_path / f'a{k}.tar'
        with tarfile.open(archive, 'w') as t:
            add_file(t, 'ok/fine.txt', b'ok')
            add_file(t, second, b'again')
        assert_refused_and_nothing_written(tmp_path, archive, 'twice|both a file and a folder')


def test_extraction_is_renamed_into_place_whole_and_keeps_what_exists(tmp_path):
    archive = tmp_path / 'a.tar.gz'
    with tarfile.open(archive, 'w:gz') as t:
        add_dir(t, './')
        add_file(t, './top/inner/file.txt', b'new')
        add_file(t, 'other.txt', b'new')
    os.umask(umask := os.umask(0o022))
    dest = tmp_path / 'root' / 'dest'                                            # a fresh destination
    data.extract_archive(str(archive), str(dest))
    assert files_under(dest) == ['other.txt', 'top/inner/file.txt']
    assert os.listdir(dest.parent) == ['dest']                                   # no temporary folder beside it
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(dest / 'other.txt').st_mode) == 0o666 & ~umask
    (dest / 'other.txt').write_bytes(b'mine')                                    # a destination with entries
    (dest / 'top').rename(dest / 'moved')
    data.extract_archive(str(archive), str(dest))
    assert (dest / 'other.txt').read_bytes() == b'mine' and (dest / 'top' / 'inner' / 'file.txt').read_bytes() == b'new'
    assert sorted(os.listdir(dest)) == ['moved', 'other.txt', 'top'] and os.listdir(dest.parent) == ['dest']


def test_destination_behind_a_symlink_is_resolved(tmp_path):
    """A data folder that is a link to another disk is a normal set-up: the archive lands in its target."""
    archive = tmp_path / 'a.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        z.writestr('trees/dev.txt', b'(2 ok)\n')
    (tmp_path / 'real').mkdir()
    os.symlink(tmp_path / 'real', tmp_path / 'link')
    data.download_and_extract(archive.as_uri(), str(tmp_path / 'link'), checksum=sha256(archive))
    assert (tmp_path / 'real' / 'trees' / 'dev.txt').read_bytes() == b'(2 ok)\n'
    assert os.path.islink(tmp_path / 'link')
