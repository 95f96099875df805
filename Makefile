# pg-reflinker. `make test` sets up everything a fresh Debian machine needs (as root) and runs
# every test; `make demo` shows the product working. See README.md.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
# Go tools are built once into a cache outside the checkout, so fresh clones reuse them.
TOOLS_CACHE ?= $(HOME)/.cache/pg-reflinker
CSI_SANITY_VERSION := v5.4.0
CSI_SANITY := $(TOOLS_CACHE)/csi-sanity-$(CSI_SANITY_VERSION)/csi-sanity
DEBIAN_PACKAGES := xfsprogs util-linux coreutils openssl postgresql postgresql-contrib \
	containerd runc containernetworking-plugins buildah debootstrap patchelf iptables iproute2 busybox-static procps \
	btrfs-progs
PYTEST_ARGS ?=
# Wall time of each set-up step and test stage, printed at the end of `make test`.
TIMINGS := $(CURDIR)/$(STAMPS)/timings
TIMER := TIMINGS=$(TIMINGS) tests/tools/timer.sh

.PHONY: help
help:
	@echo "make demo      the whole job on one machine: a real one-node cluster, the CNPG operator,"
	@echo "               a running CNPG Cluster cloned into a new one"
	@echo "make test      set up (Debian packages, venv, Go tools, images) and run every test"
	@echo "make cluster-test  only the scenarios on the real one-node cluster"
	@echo "make unit      core and reconciler tests (no root, no loop devices), under a minute"
	@echo "make e2e       only the end-to-end tests on the control plane with kubelet played"
	@echo "make conformance  the Kubernetes storage e2e suites against the driver; docs/conformance.md"
	@echo "make bench     new CNPG Cluster from a running one vs pg_basebackup, 1/4/16 GiB; docs/"
	@echo "make bench-stack  the driver's stack: clone time vs cp --reflink and pg_basebackup"
	@echo "make sanity    run csi-sanity against reflinker-csi standalone on a fresh XFS"
	@echo "make lint      ruff and mypy --strict"
	@echo "make proto     regenerate csi/ from proto/csi.proto"
	@echo "make bench-clone  hot clone vs bare reflink copy vs pg_basebackup, per PostgreSQL major"
	@echo "make pg-majors PostgreSQL 17 and 18 from Debian trixie and forky (once, for the host tests)"
	@echo "make images    the test cluster's Debian-based images (project, PostgreSQL 15/17/18), once per input"
	@echo "make bench-space  filesystem growth of written clones per XFS CoW extent size hint"
	@echo "make bench-scale  clone time against size and fragmentation, XFS and btrfs"
	@echo "make hot-clone-matrix  every hot-clone test on every PostgreSQL major and method"

# -- set-up -------------------------------------------------------------------------------

$(STAMPS)/system: Makefile
	@mkdir -p $(STAMPS)
	@$(TIMER) start "Debian packages"
	@missing=$$(dpkg-query -W -f '$${db:Status-Abbrev} $${Package}\n' $(DEBIAN_PACKAGES) 2>&1 \
		| awk '$$1 != "ii" {print $$NF}'); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
	fi
	@$(TIMER) end "Debian packages"
	@touch $@

$(STAMPS)/venv: pyproject.toml requirements.lock
	@mkdir -p $(STAMPS)
	@$(TIMER) start "Python venv"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@$(TIMER) end "Python venv"
	@touch $@

$(CSI_SANITY):
	@echo "building csi-sanity $(CSI_SANITY_VERSION) (once, into $(TOOLS_CACHE))"
	@$(TIMER) start "build csi-sanity"
	GOBIN=$(dir $@) GOFLAGS=-mod=mod go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$(CSI_SANITY_VERSION)
	@$(TIMER) end "build csi-sanity"

.PHONY: deps
deps: $(STAMPS)/system $(STAMPS)/venv $(CSI_SANITY)

# PostgreSQL 17 and 18 from Debian trixie and forky, beside this machine's 15: each a debootstrap
# root, built once, outside /root so the postgres user can run its programs.
PG_ROOTS ?= /var/cache/pg-reflinker/postgresql
.PHONY: pg-majors
pg-majors: $(STAMPS)/system $(STAMPS)/venv
	@$(TIMER) start "PostgreSQL majors"
	TIMINGS=$(TIMINGS) PG_ROOTS=$(PG_ROOTS) $(PY) -m tests.tools.pgmajors
	@$(TIMER) end "PostgreSQL majors"

# -- checks -------------------------------------------------------------------------------

# After the packages and the venv, the set-up runs two steps at a time, the PostgreSQL majors and
# the container images beside the Go builds: their debootstraps mostly wait on the network and
# the disk while the Go builds use the CPU (each step's output comes whole, when it ends). The
# storage conformance suites' tools (e2e.test: ten minutes of compiling on a fresh machine) are
# only needed after pytest: they build during it, at the lowest CPU and I/O priority, in the time
# the scenarios spend waiting on clusters; their output goes to .stamps/conformance-tools.log.
.PHONY: test
test:
	@$(TIMER) reset && $(TIMER) start "make test"
	@status=0; \
	$(MAKE) --no-print-directory deps && \
	$(MAKE) --no-print-directory -j2 --output-sync=target pg-majors k8s-tools images lint \
		|| status=$$?; \
	if [ $$status = 0 ]; then \
		nice -n 19 ionice -c 3 $(MAKE) --no-print-directory conformance-tools \
			>$(STAMPS)/conformance-tools.log 2>&1 & tools=$$!; \
		$(TIMER) start "pytest"; \
		CSI_SANITY=$(CSI_SANITY) TIMINGS=$(TIMINGS) $(TOOLS_ENV) $(PY) -m pytest -ra $(PYTEST_ARGS) \
			|| status=$$?; \
		$(TIMER) end "pytest"; \
		wait $$tools || { status=$$?; cat $(STAMPS)/conformance-tools.log; }; \
	fi; \
	if [ $$status = 0 ]; then \
		$(TIMER) start "conformance"; \
		TIMINGS=$(TIMINGS) $(TOOLS_ENV) CONFORMANCE_TOOLS=$(CONFORMANCE_TOOLS) $(PY) -m tests.conformance.run \
			|| status=$$?; \
		$(TIMER) end "conformance"; \
	fi; \
	$(TIMER) end "make test"; $(TIMER) report; exit $$status

.PHONY: sanity
sanity: deps
	CSI_SANITY=$(CSI_SANITY) REFLINKER=$(VENV)/bin/reflinker-csi \
		tests/tools/with-xfs.sh 2G tests/tools/sanity.sh

.PHONY: lint
lint: $(STAMPS)/venv
	$(VENV)/bin/ruff check reflinker_csi tests
	$(VENV)/bin/ruff format --check reflinker_csi tests
	$(VENV)/bin/mypy --strict reflinker_csi

.PHONY: proto
proto: $(STAMPS)/venv
	$(PY) -m grpc_tools.protoc -Icsi=proto --python_out=. --grpc_python_out=. csi/csi.proto

.PHONY: clean
clean:
	rm -rf $(VENV) $(STAMPS) .pytest_cache .mypy_cache .ruff_cache

# The Debian-based container images of the test cluster (the project's from the Dockerfile, and
# CNPG's PostgreSQL 15, 17 and 18), once per input into the tool cache (tests/e2e/images.py).
.PHONY: images
images: $(STAMPS)/system $(STAMPS)/venv
	@$(TIMER) start "container images"
	TIMINGS=$(TIMINGS) TOOLS_CACHE=$(TOOLS_CACHE) $(PY) -m tests.e2e.images
	@$(TIMER) end "container images"

.PHONY: bench-clone
bench-clone: $(STAMPS)/system $(STAMPS)/venv pg-majors
	$(PY) -m tests.bench.bench_clone

# Every hot-clone test on every PostgreSQL major and both methods (make test runs the matrix
# pairwise: tests/conftest.py).
.PHONY: hot-clone-matrix
hot-clone-matrix: $(STAMPS)/system $(STAMPS)/venv pg-majors
	HOT_CLONE_MATRIX=full PG_ROOTS=$(PG_ROOTS) $(PY) -m pytest -ra -p no:cacheprovider tests/host/test_hot_clone.py $(PYTEST_ARGS)

.PHONY: bench-space
bench-space: $(STAMPS)/system $(STAMPS)/venv
	$(PY) -m tests.bench.bench_space

.PHONY: bench-scale
bench-scale: $(STAMPS)/system $(STAMPS)/venv pg-majors
	$(PY) -m tests.bench.bench_scale

# -- Kubernetes control plane for the end-to-end tests --------------------------------------
K8S_TOOLS_KEY := $(shell sha256sum tests/tools/k8s/go.sum 2>/dev/null | cut -c1-12)
K8S_TOOLS := $(TOOLS_CACHE)/k8s-$(K8S_TOOLS_KEY)

K8S_VERSION := v1.36.1
K8S_LDFLAGS := -X k8s.io/component-base/version.gitVersion=$(K8S_VERSION)

$(K8S_TOOLS)/.built: tests/tools/k8s/go.mod tests/tools/k8s/go.sum $(wildcard tests/tools/k8s/cmd/*/*.go)
	@echo "building the one-node cluster (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,"
	@echo "kube-proxy, kubelet, kubectl), csi-provisioner and the test stand-ins into $(K8S_TOOLS)"
	@echo "(once per go.sum; the first build takes 15-25 minutes on 2 cores)"
	@$(TIMER) start "build the cluster's Go tools"
	mkdir -p $(K8S_TOOLS)
	cd tests/tools/k8s && CGO_ENABLED=0 go build -v -trimpath -ldflags "$(K8S_LDFLAGS)" -o $(K8S_TOOLS)/ \
		k8s.io/kubernetes/cmd/kube-apiserver \
		k8s.io/kubernetes/cmd/kube-controller-manager \
		k8s.io/kubernetes/cmd/kube-scheduler \
		k8s.io/kubernetes/cmd/kube-proxy \
		k8s.io/kubernetes/cmd/kubelet \
		k8s.io/kubernetes/cmd/kubectl \
		github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner \
		./cmd/pause ./cmd/registrar-standin ./cmd/livenessprobe-standin 2>&1 \
		| awk '/^#|\.go:[0-9]+:/ {print; next} NR % 100 == 0 {printf "  ... %d packages compiled\n", NR; fflush()}'
	cd tests/tools/k8s && CGO_ENABLED=0 go build -trimpath -o $(K8S_TOOLS)/etcd go.etcd.io/etcd/server/v3
	@$(TIMER) end "build the cluster's Go tools"
	@touch $@

# Volume snapshots for the same cluster: external-snapshotter's snapshot-controller and
# csi-snapshotter sidecar, and the snapshot CRDs of its client module, next to the other tools.
SNAPSHOTTER_VERSION := v8.6.0
SNAPSHOTTER_KEY := $(shell sha256sum tests/tools/snapshotter/go.sum 2>/dev/null | cut -c1-12)
SNAPSHOTTER_BUILT := $(K8S_TOOLS)/.snapshotter-$(SNAPSHOTTER_KEY)

$(SNAPSHOTTER_BUILT): tests/tools/snapshotter/go.mod tests/tools/snapshotter/go.sum $(K8S_TOOLS)/.built
	@echo "building snapshot-controller and csi-snapshotter $(SNAPSHOTTER_VERSION) into $(K8S_TOOLS) (once, ~4 minutes)"
	@$(TIMER) start "build external-snapshotter"
	cd tests/tools/snapshotter && CGO_ENABLED=0 go build -trimpath -o $(K8S_TOOLS)/ \
		github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller \
		github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter
	mkdir -p $(K8S_TOOLS)/snapshot-crds
	cd tests/tools/snapshotter && cp "$$(go list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshotter/client/v8)"/config/crd/snapshot.storage.k8s.io_*.yaml $(K8S_TOOLS)/snapshot-crds/
	cd tests/tools/snapshotter && cp "$$(go list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshotter/v8)"/deploy/kubernetes/snapshot-controller/*.yaml $(K8S_TOOLS)/snapshot-crds/
	chmod -R u+w $(K8S_TOOLS)/snapshot-crds
	@$(TIMER) end "build external-snapshotter"
	@touch $@

# The ReferenceGrant CRD of the Gateway API (a source namespace's consent to clones into another
# namespace), from its Go module, next to the other tools.
GATEWAY_API_VERSION := v1.4.1
GATEWAY_CRD := $(K8S_TOOLS)/gateway-crds/referencegrants-$(GATEWAY_API_VERSION).yaml

$(GATEWAY_CRD):
	@$(TIMER) start "fetch the ReferenceGrant CRD"
	mkdir -p $(dir $@)
	dir=$$(GOFLAGS=-mod=mod go mod download -json sigs.k8s.io/gateway-api@$(GATEWAY_API_VERSION) \
		| sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p'); \
	cp "$$dir/config/crd/standard/gateway.networking.k8s.io_referencegrants.yaml" $@.partial
	mv $@.partial $@
	@$(TIMER) end "fetch the ReferenceGrant CRD"

# Cluster DNS for the multi-node cluster: CoreDNS with the kubernetes plugin, from its Go module.
COREDNS_VERSION := v1.15.0
COREDNS_KEY := $(shell sha256sum tests/tools/coredns/go.sum 2>/dev/null | cut -c1-12)
COREDNS := $(TOOLS_CACHE)/coredns-$(COREDNS_KEY)/coredns

$(COREDNS): tests/tools/coredns/go.mod tests/tools/coredns/go.sum tests/tools/coredns/main.go
	@echo "building CoreDNS $(COREDNS_VERSION) into $(dir $(COREDNS)) (once, ~2 minutes)"
	@$(TIMER) start "build CoreDNS"
	mkdir -p $(dir $(COREDNS))
	cd tests/tools/coredns && CGO_ENABLED=0 go build -trimpath -o $(COREDNS).partial .
	mv $(COREDNS).partial $(COREDNS)
	@$(TIMER) end "build CoreDNS"

# The S3-compatible object store CloudNativePG archives WAL to in the HA scenarios: versitygw.
OBJECT_STORE_VERSION := v1.8.0
OBJECT_STORE_KEY := $(shell sha256sum tests/tools/objectstore/go.sum 2>/dev/null | cut -c1-12)
OBJECT_STORE := $(TOOLS_CACHE)/objectstore-$(OBJECT_STORE_KEY)/versitygw

$(OBJECT_STORE): tests/tools/objectstore/go.mod tests/tools/objectstore/go.sum
	@echo "building versitygw $(OBJECT_STORE_VERSION) into $(dir $(OBJECT_STORE)) (once, ~3 minutes)"
	@$(TIMER) start "build versitygw"
	mkdir -p $(dir $(OBJECT_STORE))
	cd tests/tools/objectstore && CGO_ENABLED=0 go build -trimpath -o $(OBJECT_STORE).partial \
		github.com/versity/versitygw/cmd/versitygw
	mv $(OBJECT_STORE).partial $(OBJECT_STORE)
	@$(TIMER) end "build versitygw"

# The CloudNativePG operator (its manager binary and release manifest) for the real cluster.
CNPG_VERSION := 1.30.0
CNPG_TOOLS_KEY := $(shell sha256sum tests/tools/cnpg/go.sum 2>/dev/null | cut -c1-12)
CNPG_TOOLS := $(TOOLS_CACHE)/cnpg-$(CNPG_TOOLS_KEY)

$(CNPG_TOOLS)/.built: tests/tools/cnpg/go.mod tests/tools/cnpg/go.sum
	@echo "building the CloudNativePG operator $(CNPG_VERSION) into $(CNPG_TOOLS) (once, ~3 minutes)"
	@$(TIMER) start "build the CloudNativePG operator"
	mkdir -p $(CNPG_TOOLS)
	cd tests/tools/cnpg && CGO_ENABLED=0 go build -trimpath -o $(CNPG_TOOLS)/manager \
		github.com/cloudnative-pg/cloudnative-pg/cmd/manager
	cd tests/tools/cnpg && cp "$$(go list -m -f '{{.Dir}}' github.com/cloudnative-pg/cloudnative-pg)/releases/cnpg-$(CNPG_VERSION).yaml" $(CNPG_TOOLS)/
	@$(TIMER) end "build the CloudNativePG operator"
	@touch $@

# The Kubernetes storage e2e suites (make conformance): e2e.test, ginkgo and agnhost.
CONFORMANCE_TOOLS_KEY := $(shell sha256sum tests/tools/conformance/go.sum 2>/dev/null | cut -c1-12)
CONFORMANCE_TOOLS := $(TOOLS_CACHE)/conformance-$(CONFORMANCE_TOOLS_KEY)

$(CONFORMANCE_TOOLS)/.built: tests/tools/conformance/go.mod tests/tools/conformance/go.sum
	@echo "building e2e.test, ginkgo and agnhost into $(CONFORMANCE_TOOLS) (once, ~10 minutes)"
	@$(TIMER) start "build e2e.test, ginkgo and agnhost"
	mkdir -p $(CONFORMANCE_TOOLS)
	cd tests/tools/conformance && CGO_ENABLED=0 go test -c -trimpath -ldflags "$(K8S_LDFLAGS)" \
		-o $(CONFORMANCE_TOOLS)/e2e.test k8s.io/kubernetes/test/e2e
	cd tests/tools/conformance && CGO_ENABLED=0 go build -trimpath -o $(CONFORMANCE_TOOLS)/ \
		k8s.io/kubernetes/test/images/agnhost github.com/onsi/ginkgo/v2/ginkgo
	@$(TIMER) end "build e2e.test, ginkgo and agnhost"
	@touch $@

# Helm 4, Helm 3 and helm-docs for the chart (charts/pg-reflinker), from their Go modules.
HELM_VERSION := v4.3.2
HELM3_VERSION := v3.21.4
# Helm 3 takes the Kubernetes version it renders for when none is asked from its build (1.20
# otherwise, which the chart's kubeVersion refuses): the test cluster's.
HELM3_KUBE := $(word 2,$(subst ., ,$(K8S_VERSION)))
HELM3_LDFLAGS := -X helm.sh/helm/v3/internal/version.version=$(HELM3_VERSION) \
	$(foreach pkg,pkg/chartutil pkg/lint/rules,-X helm.sh/helm/v3/$(pkg).k8sVersionMajor=1 \
	-X helm.sh/helm/v3/$(pkg).k8sVersionMinor=$(HELM3_KUBE))
HELM_TOOLS_KEY := $(shell (cat tests/tools/helm/go.sum; echo '$(HELM_VERSION) $(HELM3_LDFLAGS)') \
	2>/dev/null | sha256sum | cut -c1-12)
HELM_TOOLS := $(TOOLS_CACHE)/helm-$(HELM_TOOLS_KEY)

$(HELM_TOOLS)/.built: tests/tools/helm/go.mod tests/tools/helm/go.sum
	@echo "building helm $(HELM_VERSION), helm $(HELM3_VERSION) and helm-docs into $(HELM_TOOLS) (once, ~5 minutes)"
	@$(TIMER) start "build helm and helm-docs"
	mkdir -p $(HELM_TOOLS)
	cd tests/tools/helm && CGO_ENABLED=0 go build -trimpath \
		-ldflags "-X helm.sh/helm/v4/internal/version.version=$(HELM_VERSION)" -o $(HELM_TOOLS)/ \
		helm.sh/helm/v4/cmd/helm github.com/norwoodj/helm-docs/cmd/helm-docs
	cd tests/tools/helm && CGO_ENABLED=0 go build -trimpath \
		-ldflags "$(HELM3_LDFLAGS)" -o $(HELM_TOOLS)/helm3 \
		helm.sh/helm/v3/cmd/helm
	@$(TIMER) end "build helm and helm-docs"
	@touch $@

.PHONY: helm-tools
helm-tools: $(HELM_TOOLS)/.built

# deploy/ (for kubectl apply -k) and the chart's README, both generated from the chart.
.PHONY: deploy
deploy: $(STAMPS)/venv $(HELM_TOOLS)/.built
	HELM_TOOLS=$(HELM_TOOLS) $(PY) -m tests.tools.chart

TOOLS_ENV := K8S_TOOLS=$(K8S_TOOLS) CNPG_TOOLS=$(CNPG_TOOLS) HELM_TOOLS=$(HELM_TOOLS) \
	TOOLS_CACHE=$(TOOLS_CACHE) PG_ROOTS=$(PG_ROOTS) COREDNS=$(COREDNS) \
	OBJECT_STORE=$(OBJECT_STORE)

.PHONY: k8s-tools
k8s-tools: $(K8S_TOOLS)/.built $(SNAPSHOTTER_BUILT) $(CNPG_TOOLS)/.built $(GATEWAY_CRD) $(HELM_TOOLS)/.built \
	$(COREDNS) $(OBJECT_STORE)

# The tiers by folder (docs/testing.md): tests/unit needs nothing but the Go and Helm tools,
# tests/kube a kube-apiserver and etcd in-process; no root, no loop devices, no PostgreSQL.
# Seconds, not minutes. tests/host needs root, loop filesystems and PostgreSQL; tests/e2e the
# control plane; tests/cluster the real cluster.
UNIT_TESTS := tests/unit tests/kube

.PHONY: unit
unit: $(STAMPS)/venv $(K8S_TOOLS)/.built $(GATEWAY_CRD) $(HELM_TOOLS)/.built
	K8S_TOOLS=$(K8S_TOOLS) HELM_TOOLS=$(HELM_TOOLS) $(PY) -m pytest -ra -p no:cacheprovider $(UNIT_TESTS) $(PYTEST_ARGS)

.PHONY: e2e
e2e: deps k8s-tools
	$(TOOLS_ENV) $(PY) -m pytest -ra -p no:cacheprovider tests/e2e $(PYTEST_ARGS)

.PHONY: demo
demo: deps k8s-tools
	$(TOOLS_ENV) $(PY) -m tests.tools.demo

.PHONY: cluster-test
cluster-test: deps k8s-tools
	$(TOOLS_ENV) $(PY) -m pytest -ra -p no:cacheprovider tests/cluster $(PYTEST_ARGS)

.PHONY: bench
bench: deps k8s-tools
	$(TOOLS_ENV) $(PY) -m tests.bench.bench_cluster

.PHONY: conformance-tools
conformance-tools: $(CONFORMANCE_TOOLS)/.built

.PHONY: conformance
conformance: deps k8s-tools conformance-tools
	$(TOOLS_ENV) CONFORMANCE_TOOLS=$(CONFORMANCE_TOOLS) $(PY) -m tests.conformance.run

.PHONY: bench-stack
bench-stack: deps k8s-tools
	$(TOOLS_ENV) $(PY) -m tests.bench.bench_stack

# The controller at BENCH_OBJECTS claims and records (10,000) on a real API server: time to
# ready and resident memory, against the chart's limit.
BENCH_OBJECTS ?= 10000
.PHONY: bench-scale-kube
bench-scale-kube: deps k8s-tools
	BENCH_OBJECTS=$(BENCH_OBJECTS) $(TOOLS_ENV) $(PY) -m tests.bench.bench_kube_scale
