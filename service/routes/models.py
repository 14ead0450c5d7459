"""`/v1/models`: the model registry (list, read, upload, delete) and each model's
certificate memory (size, reset). Upload, delete and reset need an admin key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service import jobs, parameters
from service.deps import AdminDep, Caller, CallerDep, SettingsDep, StoreDep
from service.errors import APIError, InvalidRequest, NotFound, responses
from service.schemas import MemoryNamespaceOut, MemoryOut, ModelOut, ModelsOut
from service.store import ModelRecord, Store
from smoothcert.archive import check_state_dict, inspect_bundle, read_bundle_files
from smoothcert.endpoints import allowed
from smoothcert.manifest import BundleError, ModelSpec
from smoothcert.results import parse_namespace

router = APIRouter(prefix="/v1/models", tags=["models"])



def model_out(record: ModelRecord) -> ModelOut:
    spec = parameters.model_spec(record).to_json()  # every default filled in
    return ModelOut(
        name=record.name, digest=record.digest, kind=spec["kind"], input_shape=spec["input_shape"],
        num_classes=spec["num_classes"], labels=spec["labels"], sigma=spec["sigma"],
        size=record.size, created=record.created, spec=record.spec,
    )


@router.get("", response_model=ModelsOut, responses=responses(401, 503))
def list_models(store: StoreDep, caller: CallerDep) -> ModelsOut:
    """Every registered model."""
    return ModelsOut(models=[model_out(m) for m in store.list_models()])


@router.get("/{name}", response_model=ModelOut, responses=responses(401, 404, 503))
async def get_model(name: str, store: StoreDep, caller: CallerDep) -> ModelOut:
    """One model: its digest and what it takes (input shape, classes, σ range)."""
    return model_out(await jobs.find_model(store, name))


def vet_bundle(data: bytes, max_bytes: int,
               remote_endpoints: list[str] | tuple[str, ...] = ()) -> tuple[ModelSpec, str]:
    """(spec, digest) of an uploaded zip, torch-free: safe unzip, valid model.json, the
    network files its format needs, state dicts whose pickle imports nothing but tensors, and
    a remote model's endpoint inside `remote_endpoints` (the allow-list; nothing is contacted
    here: the worker resolves, pins and checks the address). The digest is the loader's
    (`inspect_bundle`), so the registry, the memory namespace and every certificate name one
    digest. Whether the weights fit the architecture, and a .pt2's program, are checked by
    the worker that loads them (that needs torch)."""
    files = read_bundle_files(data, max_total_bytes=max_bytes, max_member_bytes=max_bytes)
    try:
        spec, names, digest = inspect_bundle(files)
    except RecursionError:
        raise BundleError("model.json is nested too deeply") from None
    if spec.remote is not None and not allowed(spec.remote.endpoint, remote_endpoints):
        raise BundleError(f"remote.endpoint {spec.remote.endpoint!r} is not in this service's allow-list "
                          "(SMOOTHCERT_REMOTE_ENDPOINTS); an operator adds it there")
    if spec.architecture is not None:  # state dicts: no pickled code (a .pt2 is vetted by the loader)
        for name in names:
            check_state_dict(files[name], name)
    return spec, digest


_UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["bundle"],
               "properties": {"bundle": {"type": "string", "format": "binary",
                                         "description": "the bundle as a .zip (model.json + network)"}}},
    "examples": {"bundle": {"summary": "A bundle zip: model.json and weights.pt (docs/bundles.md)",
                            "value": {"bundle": "digits.zip"}}}}}}}


@router.post("", status_code=201, response_model=ModelOut, openapi_extra=_UPLOAD_DOC,
             responses=responses(401, 403, 413, 415, 422, 503))
async def upload_model(request: Request, response: Response, settings: SettingsDep,
                       store: StoreDep, admin: AdminDep) -> ModelOut:
    """Register a bundle (multipart field `bundle`, a zip) under its model.json name,
    replacing an earlier bundle of that name. A remote model's endpoint must be in the
    allow-list (SMOOTHCERT_REMOTE_ENDPOINTS)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise APIError(415, "unsupported_media_type", "send multipart/form-data with a 'bundle' file")
    form = await request.form(max_files=1, max_fields=8)
    try:
        bundle = form.get("bundle")
        if not isinstance(bundle, UploadFile):
            raise InvalidRequest("bundle: a multipart file part 'bundle' (a .zip) is required")
        data = await bundle.read()
    finally:
        await form.close()
    if len(data) > settings.max_bundle_bytes:
        raise APIError(413, "too_large", f"bundle: {len(data)} bytes, more than the "
                       f"{settings.max_bundle_bytes} accepted (SMOOTHCERT_MAX_BUNDLE_BYTES)")
    try:
        spec, digest = await run_in_threadpool(vet_bundle, data, settings.max_bundle_bytes, settings.remote_endpoints)
    except BundleError as exc:
        raise APIError(422, "invalid_bundle", str(exc)) from None
    record = await run_in_threadpool(store.put_model, spec.name, digest, spec.to_json(), data)
    response.headers["Location"] = f"/v1/models/{spec.name}"
    return model_out(record)


@router.delete("/{name}", response_model=ModelOut, responses=responses(401, 403, 404, 503))
async def delete_model(name: str, store: StoreDep, admin: AdminDep) -> ModelOut:
    """Unregister a model (admin) and answer what it was. Its bundle is deleted unless another
    name holds the same digest; queued jobs on it then fail with `bad_model`. Its certificate
    memory is kept, by digest: uploading the same bundle again brings it back."""
    record = await run_in_threadpool(store.delete_model, name)
    if record is None:
        raise NotFound(f"no model named {name!r} is registered (GET /v1/models lists them)",
                       code="model_not_found")
    return model_out(record)


def memory_out(store: Store, settings, name: str, digest: str, caller: Caller) -> MemoryOut:
    """Every memory of the model with `digest` (blocking)."""
    namespaces = []
    for namespace in store.memory_namespaces(digest):
        _, mode, device, alpha = parse_namespace(namespace)
        entries, size = store.memory_size(namespace)
        namespaces.append(MemoryNamespaceOut(namespace=namespace, numeric_mode=mode, device=device, alpha=alpha,
                                             entries=entries, bytes=size))
    total = sum(m.entries for m in namespaces)
    return MemoryOut(model=name, digest=digest, size=total, entries=total, bytes=sum(m.bytes for m in namespaces),
                     capacity=settings.memory_capacity, levels=settings.memory_alphas, min_n=settings.memory_min_n,
                     quota_per_key=settings.memory_quota_per_key,
                     your_commits=store.memory_commits_of(digest, caller.owner), namespaces=namespaces)


@router.get("/{name}/memory", response_model=MemoryOut, name="get_model_memory", responses=responses(401, 404, 503))
async def get_memory(name: str, settings: SettingsDep, store: StoreDep, caller: CallerDep) -> MemoryOut:
    """The model's certificate memories (every numeric mode, device type and α): committed
    entries and their size, and the rules of a commit."""
    record = await jobs.find_model(store, name)
    return await run_in_threadpool(memory_out, store, settings, name, record.digest, caller)


@router.delete("/{name}/memory", response_model=MemoryOut, name="reset_model_memory",
                responses=responses(401, 403, 404, 503))
async def reset_memory(name: str, settings: SettingsDep, store: StoreDep, admin: AdminDep) -> MemoryOut:
    """Drop every entry of every memory of the model, and the keys' commit counts (admin).
    Certificates issued before stay valid statements, but later answers no longer respect them."""
    record = await jobs.find_model(store, name)
    await run_in_threadpool(store.memory_reset_model, record.digest)
    return await run_in_threadpool(memory_out, store, settings, name, record.digest, admin)
