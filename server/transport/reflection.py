"""Server reflection that serves our descriptors with their comments, for `grpcurl describe`."""

from __future__ import annotations

from importlib import resources

from google.protobuf import descriptor_pb2
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
    """grpc_reflection's asyncio servicer (the server is grpc.aio), serving the
    descriptors of `make proto` with their comments."""

    def __init__(self, service_names):
        super().__init__(service_names)
        self._documented = _documented_files()

    def _response(self, descriptor, request):
        files, pending = {}, [descriptor]
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

    def _file_by_filename(self, request, filename):
        try:
            return self._response(self._pool.FindFileByName(filename), request)
        except KeyError:
            return super()._file_by_filename(request, filename)

    def _file_containing_symbol(self, request, fully_qualified_name):
        # The pool does not index methods: `grpcurl describe Service.Method` asks for
        # one, so look up its service.
        for name in (fully_qualified_name, fully_qualified_name.rpartition(".")[0]):
            try:
                return self._response(self._pool.FindFileContainingSymbol(name), request)
            except KeyError:
                continue
        return super()._file_containing_symbol(request, fully_qualified_name)


def add_reflection(server, service_names) -> None:
    names = (*service_names, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        DocumentedReflectionServicer(names), server
    )
