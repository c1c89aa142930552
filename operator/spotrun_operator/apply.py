"""The one module that writes to the Kubernetes API: status, children, pod deletions, events.

Keeping every write here makes the reconcile loop readable as decide-then-do, lets the
tests and the docs list exactly what the operator ever changes, and gives one place to
get the preconditions right:

- the status write carries the resourceVersion the pass read, so a pass that decided on
  a stale view is refused (409) and re-run instead of undoing a newer write;
- pod deletions carry the pod's UID, so deleting an old `<job>-0` can never hit the new
  `<job>-0` the StatefulSet created in its place;
- creations are idempotent (409 AlreadyExists means done, or a patch to what we want).

The kubernetes client is synchronous; every call runs in a worker thread so that the
event loop (all the jobs' loops, kopf's watches) never blocks on the network.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import kopf
from kubernetes import client
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from spotrun_operator import metrics, names
from spotrun_operator.transitions import Event

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
FIELD_MANAGER = "spotrun-operator"


class Conflict(Exception):
    """The TrainJob changed since it was read: the pass must read again and re-decide."""


class Gone(Exception):
    """The TrainJob no longer exists."""


class Api:
    """Thin, typed wrappers over the calls the operator makes."""

    def __init__(self, api_client: ApiClient) -> None:
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Runs one API call in a worker thread; returns the answer's JSON body.

        The answer is not turned into the client's models (`_preload_content=False`):
        parsing a whole StatefulSet into pydantic objects costs more CPU than the request,
        and the operator reads nothing but a few fields of the TrainJob back.
        """
        metrics.API_CALLS.labels(getattr(fn, "__name__", "call")).inc()
        response = await asyncio.to_thread(fn, *args, _preload_content=False, **kwargs)
        try:
            data = response.data
        finally:
            response.release_conn()
        body: dict[str, Any] = json.loads(data) if data else {}
        return body

    # -- the TrainJob ----------------------------------------------------------------

    async def read_job(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            body = await self._call(
                self.custom.get_namespaced_custom_object,
                names.GROUP,
                names.VERSION,
                namespace,
                names.PLURAL,
                name,
            )
        except ApiException as err:
            if err.status == 404:
                raise Gone(f"TrainJob {namespace}/{name} is gone") from None
            raise
        return body

    async def write_status(
        self, namespace: str, name: str, resource_version: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patches `status` if the job is still at `resource_version`; returns the new job."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": dict(status)}
        try:
            result = await self._call(
                self.custom.patch_namespaced_custom_object_status,
                names.GROUP,
                names.VERSION,
                namespace,
                names.PLURAL,
                name,
                body,
                field_manager=FIELD_MANAGER,
                _content_type=MERGE_PATCH,
            )
        except ApiException as err:
            if err.status == 409:
                raise Conflict(
                    f"TrainJob {namespace}/{name} changed since {resource_version}"
                ) from None
            if err.status == 404:
                raise Gone(f"TrainJob {namespace}/{name} is gone") from None
            raise
        return result

    async def delete_job(self, namespace: str, name: str, uid: str) -> None:
        """Deletes the TrainJob (ttlSecondsAfterFinished); its children go with it."""
        options = client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=uid), propagation_policy="Background"
        )
        try:
            await self._call(
                self.custom.delete_namespaced_custom_object,
                names.GROUP,
                names.VERSION,
                namespace,
                names.PLURAL,
                name,
                body=options,
            )
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    # -- children --------------------------------------------------------------------

    async def ensure(self, obj: Mapping[str, Any]) -> None:
        """Creates a child, or brings an existing one to what it should be."""
        kind = obj["kind"]
        namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        calls: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
            "ServiceAccount": (
                self.core.create_namespaced_service_account,
                self.core.patch_namespaced_service_account,
            ),
            "Service": (self.core.create_namespaced_service, self.core.patch_namespaced_service),
            "Role": (self.rbac.create_namespaced_role, self.rbac.patch_namespaced_role),
            "RoleBinding": (
                self.rbac.create_namespaced_role_binding,
                self.rbac.patch_namespaced_role_binding,
            ),
        }
        create, patch = calls[kind]
        try:
            await self._call(create, namespace, dict(obj), field_manager=FIELD_MANAGER)
        except ApiException as err:
            if err.status != 409:
                raise
            # It exists (an earlier pass, or an operator before a restart): make it right.
            # ServiceAccounts get secrets attached by others: only their metadata is ours.
            desired = (
                {
                    "metadata": {
                        key: obj["metadata"][key]
                        for key in ("labels", "annotations")
                        if key in obj["metadata"]
                    }
                }
                if kind == "ServiceAccount"
                else {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
            )
            await self._call(
                patch,
                name,
                namespace,
                desired,
                field_manager=FIELD_MANAGER,
                _content_type=MERGE_PATCH,
            )

    async def create_statefulset(self, obj: Mapping[str, Any]) -> None:
        namespace = obj["metadata"]["namespace"]
        try:
            await self._call(
                self.apps.create_namespaced_stateful_set,
                namespace,
                dict(obj),
                field_manager=FIELD_MANAGER,
            )
        except ApiException as err:
            if err.status != 409:
                raise
            await self.replace_statefulset_spec(obj)

    async def replace_statefulset_spec(self, obj: Mapping[str, Any]) -> None:
        """Writes the StatefulSet's replicas and template (a merge patch replaces lists whole)."""
        meta = obj["metadata"]
        patch = {
            "metadata": {"annotations": meta.get("annotations", {})},
            "spec": {"replicas": obj["spec"]["replicas"], "template": obj["spec"]["template"]},
        }
        await self._call(
            self.apps.patch_namespaced_stateful_set,
            meta["name"],
            meta["namespace"],
            patch,
            field_manager=FIELD_MANAGER,
            _content_type=MERGE_PATCH,
        )

    async def patch_statefulset(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """A strategic merge patch of StatefulSet `name` (lists such as env merge by name)."""
        try:
            await self._call(
                self.apps.patch_namespaced_stateful_set,
                name,
                namespace,
                patch,
                field_manager=FIELD_MANAGER,
                _content_type=STRATEGIC_MERGE_PATCH,
            )
        except ApiException as err:
            if err.status != 404:
                raise

    async def scale_statefulset(self, namespace: str, name: str, replicas: int) -> None:
        try:
            await self._call(
                self.apps.patch_namespaced_stateful_set,
                name,
                namespace,
                {"spec": {"replicas": replicas}},
                field_manager=FIELD_MANAGER,
                _content_type=MERGE_PATCH,
            )
        except ApiException as err:
            if err.status != 404:
                raise

    async def delete_pod(
        self, namespace: str, name: str, uid: str, *, force: bool, grace: int | None = None
    ) -> None:
        """Deletes pod `name` if it is still the one with `uid`.

        `force` (grace period 0) is for pods whose node is gone: no kubelet will ever
        confirm their end, and the StatefulSet cannot recreate the name until they are.
        `grace` overrides the pod's own terminationGracePeriodSeconds otherwise.
        """
        options = client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=uid),
            grace_period_seconds=0 if force else grace,
        )
        try:
            await self._call(self.core.delete_namespaced_pod, name, namespace, body=options)
        except ApiException as err:
            if err.status not in (404, 409):  # gone already, or replaced (UID differs)
                raise

    async def label_pod(self, namespace: str, name: str, uid: str, key: str, value: str) -> None:
        """Sets label `key` of pod `name` if it is still the one with `uid` (a JSON patch test)."""
        path = "/metadata/labels/" + key.replace("~", "~0").replace("/", "~1")
        body = [
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "add", "path": path, "value": value},
        ]
        try:
            await self._call(
                self.core.patch_namespaced_pod, name, namespace, body, _content_type=JSON_PATCH
            )
        except ApiException as err:
            if err.status not in (404, 422):  # gone already, or replaced (the test failed)
                raise

    # -- events ----------------------------------------------------------------------

    def event(self, job: Mapping[str, Any], event: Event) -> None:
        """Posts a Kubernetes event about the job (queued; kopf posts it in the background)."""
        kopf.event(
            cast(
                kopf.Body,
                {
                    "apiVersion": names.API_VERSION,
                    "kind": names.KIND,
                    "metadata": {
                        "name": job["metadata"]["name"],
                        "namespace": job["metadata"]["namespace"],
                        "uid": job["metadata"]["uid"],
                    },
                },
            ),
            type=event.type,
            reason=event.reason,
            message=event.message[:1000],
        )
