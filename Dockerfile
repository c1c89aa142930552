# syntax=docker/dockerfile:1
#
# spotrun's images, two targets of one build:
#   docker build --target operator -t <registry>/spotrun-operator:<version> .
#   docker build --target runtime  -t <registry>/spotrun-runtime:<version> .
# `operator` runs the kopf operator (python -m spotrun_operator; the Helm chart's image).
# `runtime` is the base of users' training images: spotrun[runtime] (torch) in a virtualenv on
# PATH, so `spotrun launch` (what the operator runs in every training pod) is there.
#
# The base is pinned by digest: the multi-arch index of python:3.11-slim-bookworm (Python
# 3.11.16) as published in docker-library/repo-info (repos/python/remote/3.11-slim-bookworm.md).
# To move it: `crane digest python:3.11-slim-bookworm` (or `docker buildx imagetools inspect
# python:3.11-slim-bookworm`), then replace the digest below. docs/install.md, "Images".
# No stage installs compilers: every dependency comes as a wheel, and spotrun itself is pure
# Python. hack/lint-dockerfile (hadolint) checks this file in the unit tests.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b
# What the runtime target is built FROM: the runtime-deps stage below, unless a build passes
# an image of that stage built before (hack/images passes its cached one).
ARG RUNTIME_DEPS_IMAGE=runtime-deps

# ---------------------------------------------------------------------------------------------
# Build stages: the operator's virtualenv (/opt/spotrun, which its final stage copies whole),
# and spotrun's wheel for the runtime. pip's build backend stays here.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS source
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime/ runtime/
COPY operator/ operator/

FROM source AS build-operator
RUN python -m venv /opt/spotrun \
    && /opt/spotrun/bin/pip install --no-cache-dir "/src[operator]" \
    && /opt/spotrun/bin/pip uninstall --yes pip

FROM source AS wheel
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src

# ---------------------------------------------------------------------------------------------
# Final stages: the slim base, a non-root user, the virtualenv. Nothing else.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS final-base
ENV PATH=/opt/spotrun/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# UID/GID 10001: the Helm chart's podSecurityContext.runAsUser; numeric, so that the kubelet
# can check runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 spotrun \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/spotrun --create-home \
        --shell /usr/sbin/nologin spotrun

FROM final-base AS operator
# The operator needs no pip at run time; the base's own copy goes too.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel
COPY --from=build-operator /opt/spotrun /opt/spotrun
USER 10001:10001
WORKDIR /home/spotrun
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "spotrun_operator"]

# The runtime's dependencies (torch and its CUDA libraries: several GB) in a stage of their
# own that reads nothing but pyproject.toml, so that a change to spotrun's code rebuilds only
# the small layer above it. The runtime image is a base for training images: its virtualenv
# keeps pip, so a derived image can `pip install` the training code's own dependencies.
# spotrun itself is installed here only as a stand-in (empty packages) that pip resolves the
# `runtime` extra through, then removed.
FROM final-base AS runtime-deps
COPY pyproject.toml /tmp/deps/
RUN mkdir -p /tmp/deps/runtime/spotrun /tmp/deps/operator \
    && touch /tmp/deps/README.md /tmp/deps/runtime/spotrun/__init__.py \
    && python -m venv /opt/spotrun \
    && /opt/spotrun/bin/pip install --no-cache-dir "/tmp/deps[runtime]" \
    && /opt/spotrun/bin/pip uninstall --yes spotrun \
    && rm -rf /tmp/deps

FROM ${RUNTIME_DEPS_IMAGE} AS runtime
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/spotrun/bin/pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels
USER 10001:10001
WORKDIR /workspace
# The operator sets every training pod's command (spotrun launch ...); this is for `docker run`.
CMD ["spotrun", "--help"]
