"""Server reflection that serves our descriptors with their comments, for `grpcurl describe`."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

# protoc keeps comments (source info) only in the descriptor set that `make proto`
# writes; the descriptors compiled into the _pb2 modules have none.
_DESCRIPTOR_SET = ("enrollment.v1", "enrollment.binpb")


def _documented_files() -> dict[str, bytes]:
    package, name = _DESCRIPTOR_SET
    data = resources.files(package).joinpath(name).read_bytes()
    return {
        f.name: f.SerializeToString()
        for f in descriptor_pb2.FileDescriptorSet.FromString(data).file
    }


class DocumentedReflectionServicer(reflection.aio.ReflectionServicer):
    """grpc_reflection's asyncio servicer (the server is grpc.aio), answering requests
    for our files with the descriptors of `make proto`, comments included; every other
    request gets grpc's own answer (through the public ServerReflectionInfo, one
    request at a time)."""

    def __init__(self, service_names: Iterable[str]) -> None:
        super().__init__(service_names)  # type: ignore[no-untyped-call]  # generated, untyped
        self._documented = _documented_files()
        self._descriptors = descriptor_pool.Default()  # the pool grpc's servicer reads

    async def ServerReflectionInfo(  # noqa: N802 (grpc's name)
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for request in request_iterator:
            found = self._file_asked_for(request)
            if found is None:
                async for answer in super().ServerReflectionInfo(_only(request), context):
                    yield answer
            else:
                yield self._response(found, request)

    def _file_asked_for(
        self, request: reflection_pb2.ServerReflectionRequest
    ) -> descriptor.FileDescriptor | None:
        """The file a file_by_filename or file_containing_symbol request names, or None."""
        names: tuple[str, ...]
        find: Callable[[str], descriptor.FileDescriptor]
        if request.HasField("file_by_filename"):
            names = (request.file_by_filename,)
            find = self._descriptors.FindFileByName
        elif request.HasField("file_containing_symbol"):
            # The pool does not index methods: `grpcurl describe Service.Method` asks
            # for one, so look up its service.
            symbol = request.file_containing_symbol
            names = (symbol, symbol.rpartition(".")[0])
            find = self._descriptors.FindFileContainingSymbol
        else:
            return None
        for name in names:
            try:
                return find(name)
            except KeyError:
                continue
        return None

    def _response(
        self, found: descriptor.FileDescriptor, request: reflection_pb2.ServerReflectionRequest
    ) -> reflection_pb2.ServerReflectionResponse:
        files: dict[str, bytes] = {}
        pending = [found]
        while pending:
            current = pending.pop()
            if current.name in files:
                continue
            serialized = self._documented.get(current.name)
            if serialized is None:
                proto = descriptor_pb2.FileDescriptorProto()
                current.CopyToProto(proto)
                serialized = proto.SerializeToString()
            files[current.name] = serialized
            pending.extend(current.dependencies)
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=list(files.values())
            ),
            original_request=request,
        )


async def _only(
    request: reflection_pb2.ServerReflectionRequest,
) -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
    yield request


def add_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    names = (*service_names, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        DocumentedReflectionServicer(names), server
    )
