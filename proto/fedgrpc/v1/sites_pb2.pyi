from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AnnouncedTask(_message.Message):
    __slots__ = ("name", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class SiteAnnouncement(_message.Message):
    __slots__ = ("version", "tasks", "policy", "client_id")
    class PolicyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    version: str
    tasks: _containers.RepeatedCompositeFieldContainer[AnnouncedTask]
    policy: _containers.ScalarMap[str, str]
    client_id: int
    def __init__(self, version: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[AnnouncedTask, _Mapping]]] = ..., policy: _Optional[_Mapping[str, str]] = ..., client_id: _Optional[int] = ...) -> None: ...

class AnnounceReply(_message.Message):
    __slots__ = ("announce_every_s",)
    ANNOUNCE_EVERY_S_FIELD_NUMBER: _ClassVar[int]
    announce_every_s: float
    def __init__(self, announce_every_s: _Optional[float] = ...) -> None: ...
