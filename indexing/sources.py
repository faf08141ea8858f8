"""What an index run goes through: the files under some folders, or the instances on a DICOMweb server.

A source names its items (`names`, in the order the run takes them) and reads one when the run asks
(`read`): it returns None for an item it knows to be unchanged without reading it, else the item's
entries (one per frame). It raises `InputError` for an item that cannot be indexed (its old entries
go), `Unavailable` for one that cannot be read just now (its old entries stay), and `SourceFailed`
when nothing more can be read (the run stops, keeping what it committed). `is_gone` says
whether an indexed path that the run did not come across is to be removed from the catalog.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from generation.errors import InputError
from indexing.catalog import FileEntry
from indexing.dicomweb import DicomWebFilters, DicomWebServer, InstanceRef
from indexing.files import Discovery, FileRecord, FileStat, Unavailable, discover, file_stat, instance_records, probe


class Source(Protocol):
    names: list  # paths or instance URLs, in the run's order
    skipped: list[tuple[Path | str, str]]  # found unusable before the run: (name, reason)
    roots: list[Path]  # where every torchrun rank must see the files (`Ranks.check_visible`); none for a server

    def tag(self, name) -> str | None:
        """The tag the item's entries get (None: leave the tags as they are)."""
        ...

    def read(self, name, entries: list[FileEntry], verify: bool) -> list[FileRecord] | None: ...

    def is_gone(self, path: str) -> bool: ...


def _unchanged(entry: FileEntry, stat: FileStat) -> bool:
    return (entry.size, entry.mtime_ns, entry.inode, entry.ctime_ns) == (stat.size, stat.mtime_ns, stat.inode, stat.ctime_ns)


class FolderSource:
    """The files `discover` found. Each file is tagged `tag`, else with the name of the top folder
    it was found under (for a file named on its own, its folder's name)."""

    def __init__(self, discovery: Discovery, tag: str | None = None):
        self.discovery, self.names, self.skipped = discovery, discovery.files, list(discovery.skipped)
        self._tag = tag
        self._tops = sorted(discovery.folders, key=lambda folder: -len(folder.parts))  # the deepest named folder first
        # The folders named, else the folders of the files named (checking every file would cost a stat each).
        self.roots = list(discovery.folders) or sorted({path.parent for path in discovery.files})

    def tag(self, path: Path) -> str | None:
        if self._tag is not None:
            return self._tag
        for folder in self._tops:
            if path.is_relative_to(folder):
                return folder.name
        return path.parent.name

    def read(self, path: Path, entries: list[FileEntry], verify: bool) -> list[FileRecord] | None:
        try:
            stat = file_stat(path)
        except OSError as error:  # vanished since discovery
            raise Unavailable(f"cannot read ({error.strerror or error})")
        if entries and not verify and all(_unchanged(e, stat) for e in entries):
            return None
        return probe(path, self.tag(path))

    def is_gone(self, path: str) -> bool:
        """Under a folder being indexed, not under one that could not be listed, and gone (or no
        longer an image candidate)."""
        discovery = self.discovery
        if not path.startswith(tuple(f"{folder}{os.sep}" for folder in discovery.folders)):
            return False
        if path.startswith(tuple(f"{folder}{os.sep}" for folder in discovery.unlisted)):
            return False
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:  # there, perhaps, but it cannot be looked at now
            return False
        return True


class DicomWebSource:
    """The instances a DICOMweb server lists (QIDO-RS) under some filters, fetched (WADO-RS) when new.

    An instance is named by its URL, which holds its SOPInstanceUID; one already in the catalog is
    unchanged (an instance does not change under its UID) and is not fetched again. An instance of
    this server that is in the catalog but no longer listed is gone, where the listing covers it:
    always on a run without filters (or filtered by its study's UID alone), and on a run filtered by
    modality or date only if its series was listed (an unlisted series may just be filtered out).
    """

    def __init__(self, server: DicomWebServer, filters: DicomWebFilters | None = None, tag: str | None = None):
        self.server, self._tag, self.filters = server, tag, filters or DicomWebFilters()
        self.refs: dict[str, InstanceRef] = {server.instance_url(ref): ref for ref in server.instances(self.filters)}
        self.names, self.skipped, self.roots = list(self.refs), [], []  # instances travel with the batch to the other ranks
        self._listed_series = {(ref.study_uid, ref.series_uid) for ref in self.refs.values()}

    def tag(self, name: str) -> str | None:
        return self._tag

    def read(self, name: str, entries: list[FileEntry], verify: bool) -> list[FileRecord] | None:
        if entries:
            return None
        instance = self.server.fetch(self.refs[name])
        if instance is None:
            raise Unavailable("deleted from the server since it was listed")
        return instance_records(instance, self._tag)

    def is_gone(self, path: str) -> bool:
        """Called for catalog entries the listing did not name (see the class docstring)."""
        prefix = f"{self.server.url}/studies/"
        if not path.startswith(prefix):  # another archive's entry
            return False
        study_uid, _, rest = path[len(prefix) :].partition("/series/")
        series_uid = rest.partition("/instances/")[0]
        if self.filters.study_uid and study_uid != self.filters.study_uid:
            return False
        if not (self.filters.modalities or self.filters.study_date):
            return True
        return (study_uid, series_uid) in self._listed_series


def folder_source(paths: list[str | Path], tag: str | None = None) -> FolderSource:
    """The files under `paths` (files or folders); a wrong path raises before anything is written."""
    if not paths:
        raise InputError("no paths to index; name image files or folders")
    return FolderSource(discover(paths), tag)
