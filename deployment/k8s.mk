# mailq on Kubernetes (minikube): included by the top-level Makefile. docs/kubernetes.md walks through
# it: make cluster -> make image -> make apply -> make hpa (make all runs the four).
#
# Everything runs against the kubectl context of a dedicated minikube profile, never the current
# context, so these targets cannot touch another cluster by accident.

# Sized for what `make apply` starts (tests/test_cluster_sizing.py adds up every request: the
# control plane, Knative Serving, Kourier, KEDA and mailq come to ~4.58 CPUs and ~5.9 GiB) plus a CPU
# to spare for scaling out; Knative's YAML install guide recommends 6 CPUs, 6 GB and 30 GB of disk
# for a one-node cluster.
# minikube 1.37 or newer: the first release that starts Kubernetes 1.34 (`make cluster` checks).
MINIKUBE         ?= minikube
MINIKUBE_MIN_VERSION := 1.37.0
MINIKUBE_PROFILE ?= mailq
MINIKUBE_CPUS    ?= 6
MINIKUBE_MEMORY  ?= 8g
MINIKUBE_DISK    ?= 30g
MINIKUBE_DRIVER  ?=
K8S_VERSION      ?= v1.34.0
KNATIVE_VERSION  ?= 1.23.0
KOURIER_VERSION  ?= 1.23.0
KEDA_VERSION     ?= 2.20.2

KNATIVE_CRDS := https://github.com/knative/serving/releases/download/knative-v$(KNATIVE_VERSION)/serving-crds.yaml
KNATIVE_CORE := https://github.com/knative/serving/releases/download/knative-v$(KNATIVE_VERSION)/serving-core.yaml
KOURIER_YAML := https://github.com/knative-extensions/net-kourier/releases/download/knative-v$(KOURIER_VERSION)/kourier.yaml
KEDA_YAML    := https://github.com/kedacore/keda/releases/download/v$(KEDA_VERSION)/keda-$(KEDA_VERSION).yaml

K8S_NAMESPACE := mailq
K8S_OVERLAY   := deployment/overlays/minikube
K8S_BUILD     := build/k8s
K8S_RENDERED  := $(K8S_BUILD)/mailq.yaml
GATEWAY_PORT  := 30080
KUBECTL       := kubectl --context $(MINIKUBE_PROFILE)
MK            := $(MINIKUBE) -p $(MINIKUBE_PROFILE)
# dev.local/ is on Knative's list of registries it never resolves tags against (the image exists only
# inside the minikube node). The tag is a hash of what goes into the image, so a changed source is a
# new tag, a new Knative revision and a rolling update; an unchanged one is a no-op.
IMAGE_NAME    := dev.local/mailq
IMAGE_TAG     ?= $(shell cat pyproject.toml deployment/Dockerfile .dockerignore \
                   $$(find shared functions -name '*.py' -o -name '*.json' -o -name '*.mako' | LC_ALL=C sort) \
                   2>/dev/null | sha256sum | cut -c1-12)

.PHONY: cluster image apply hpa keda re delete clean all status smoke manifests k8s-secrets k8s-render

cluster: k8s-secrets ## start minikube and install Knative Serving + Kourier and KEDA (pinned); waits until ready
	@have=$$($(MINIKUBE) version --short | sed 's/^v//'); \
	if [ "$$(printf '%s\n%s\n' "$(MINIKUBE_MIN_VERSION)" "$$have" | sort -V | head -n1)" != "$(MINIKUBE_MIN_VERSION)" ]; then \
		echo "minikube $$have is too old for Kubernetes $(K8S_VERSION): $(MINIKUBE_MIN_VERSION) or newer is needed" >&2; exit 1; fi
	$(MK) start --cpus=$(MINIKUBE_CPUS) --memory=$(MINIKUBE_MEMORY) --disk-size=$(MINIKUBE_DISK) \
		--kubernetes-version=$(K8S_VERSION) $(if $(MINIKUBE_DRIVER),--driver=$(MINIKUBE_DRIVER))
	$(KUBECTL) apply -f $(KNATIVE_CRDS)
	$(KUBECTL) wait --for=condition=Established --timeout=120s crd/services.serving.knative.dev
	$(KUBECTL) apply -f $(KNATIVE_CORE)
	$(KUBECTL) apply -f $(KOURIER_YAML)
	$(KUBECTL) patch configmap/config-network -n knative-serving --type merge \
		-p '{"data":{"ingress-class":"kourier.ingress.networking.knative.dev"}}'
	$(KUBECTL) apply --server-side --force-conflicts -f $(KEDA_YAML)
	$(KUBECTL) -n knative-serving wait deployment --all --for=condition=Available --timeout=600s
	$(KUBECTL) -n kourier-system wait deployment --all --for=condition=Available --timeout=600s
	$(KUBECTL) -n keda wait deployment --all --for=condition=Available --timeout=600s
	@echo "cluster '$(MINIKUBE_PROFILE)' is ready: Knative Serving $(KNATIVE_VERSION) with Kourier, KEDA $(KEDA_VERSION)"

image: ## build the image inside minikube (no registry): dev.local/mailq:<hash of the sources>
	$(MK) image build -t $(IMAGE_NAME):$(IMAGE_TAG) -f deployment/Dockerfile .
	@echo "built $(IMAGE_NAME):$(IMAGE_TAG)"

# Every workload that runs the mailq image is in a stage this target applies (the sweep's ScaledJob
# too), after the migration: one `make apply` moves all of them to the new image and config.
apply: k8s-render ## deploy: PostgreSQL + Redis, wait, migrate, then functions, gateway, workers and sweep; print the URL
	@$(MK) image ls 2>/dev/null | grep -q "$(IMAGE_NAME):$(IMAGE_TAG)" || \
		{ echo "image $(IMAGE_NAME):$(IMAGE_TAG) is not in minikube: run 'make image' first" >&2; exit 1; }
	$(KUBECTL) apply -f $(K8S_RENDERED) -l mailq.dev/stage=base
	$(KUBECTL) -n $(K8S_NAMESPACE) rollout status statefulset/mailq-postgres --timeout=300s
	$(KUBECTL) -n $(K8S_NAMESPACE) rollout status statefulset/mailq-redis --timeout=300s
	$(KUBECTL) -n $(K8S_NAMESPACE) delete job mailq-migrate --ignore-not-found --wait
	$(KUBECTL) apply -f $(K8S_RENDERED) -l mailq.dev/stage=migrate
	$(BIN)/python deployment/wait_job.py --kubectl "$(KUBECTL)" -n $(K8S_NAMESPACE) mailq-migrate --timeout 420
	$(KUBECTL) apply -f $(K8S_RENDERED) -l mailq.dev/stage=app
	$(KUBECTL) -n $(K8S_NAMESPACE) wait ksvc --all --for=condition=Ready --timeout=300s
	$(KUBECTL) -n $(K8S_NAMESPACE) rollout status deployment/mailq-gateway --timeout=180s
	@echo "gateway: http://$$($(MK) ip):$(GATEWAY_PORT)  (e.g. curl http://$$($(MK) ip):$(GATEWAY_PORT)/healthz/ping)"
	@echo "(if that address is not reachable from here, as with the docker driver on macOS:"
	@echo " $(MK) service -n $(K8S_NAMESPACE) mailq-gateway --url)"

keda: k8s-render ## apply KEDA's ScaledObjects (consumer, sender, webhook worker) and their TriggerAuthentication
	$(KUBECTL) apply -f $(K8S_RENDERED) -l mailq.dev/stage=keda
	$(KUBECTL) -n $(K8S_NAMESPACE) get scaledobject,scaledjob

hpa: keda ## the same as `make keda`: KEDA's scalers, which create the HPAs

all: cluster image apply hpa ## everything, from nothing: cluster, image, apply, hpa

re: ## delete mailq from the cluster (its data too) and deploy it again: delete, image, apply, hpa
	$(MAKE) delete
	$(MAKE) image apply hpa

delete: ## remove mailq from the cluster: the namespace, with PostgreSQL's and Redis's volumes
	-$(KUBECTL) -n $(K8S_NAMESPACE) delete scaledobject,scaledjob --all --ignore-not-found
	$(KUBECTL) delete namespace $(K8S_NAMESPACE) --ignore-not-found --wait

clean: ## delete the minikube profile (the whole cluster) and build/k8s/; keeps deployment/base/secrets.env
	-$(MK) delete
	rm -rf $(K8S_BUILD)

status: $(STAMP) ## the operator's view: Knative Services, KEDA scalers, pods not Ready, then the queue figures
	$(BIN)/mailq status --cluster --context $(MINIKUBE_PROFILE) --namespace $(K8S_NAMESPACE)

smoke: $(STAMP) ## after `make all`: register, enqueue 20 mails to an in-cluster sink, watch KEDA scale 0 -> N -> 0
	$(BIN)/python deployment/smoke.py --context $(MINIKUBE_PROFILE) --namespace $(K8S_NAMESPACE)

manifests: $(STAMP) ## regenerate knative/nginx.conf and knative/functions.yaml from shared/routes.py
	$(BIN)/python deployment/gen_gateway.py

# Helpers (not listed by `make help`).

# Creates deployment/base/secrets.env from the example, or adds the keys it lacks; never changes a value.
k8s-secrets: $(STAMP)
	$(BIN)/python deployment/gen_secrets.py

# The overlay, with the image tag pinned to this build, rendered once; every apply step filters it by
# its mailq.dev/stage label. Plain `kubectl kustomize`: every file the kustomizations load sits inside
# their own directories (the generated Secret's env file too), so no load restrictor is lifted.
k8s-render: k8s-secrets
	@mkdir -p $(K8S_BUILD)/overlay
	@printf '%s\n' \
		'apiVersion: kustomize.config.k8s.io/v1beta1' \
		'kind: Kustomization' \
		'resources:' \
		'  - ../../../$(K8S_OVERLAY)' \
		'images:' \
		'  - name: $(IMAGE_NAME)' \
		'    newTag: "$(IMAGE_TAG)"' > $(K8S_BUILD)/overlay/kustomization.yaml
	kubectl kustomize $(K8S_BUILD)/overlay > $(K8S_RENDERED)
	@echo "rendered $(K8S_RENDERED) with $(IMAGE_NAME):$(IMAGE_TAG)"
