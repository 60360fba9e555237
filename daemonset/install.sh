#!/bin/sh
# Install (or remove) Equilibrium on the cluster kubectl points at, in one command:
#
#   daemonset/install.sh                       # namespace, RBAC, config, DaemonSet, metrics, dashboards
#   daemonset/install.sh --image REG/equilibriumd:TAG
#   daemonset/install.sh --dry-run             # print what would be applied
#   daemonset/install.sh --delete              # remove the objects (pinned datapaths stay on the
#                                              # nodes: `equilibriumd teardown` there removes them)
#
# The ServiceMonitor is applied only when the Prometheus Operator's CRD is installed.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
image=""
mode=apply
while [ $# -gt 0 ]; do
    case "$1" in
        --image) image=${2:?--image needs a value}; shift 2 ;;
        --image=*) image=${1#--image=}; shift ;;
        --dry-run) mode=print; shift ;;
        --delete) mode=delete; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

command -v kubectl >/dev/null 2>&1 || { echo "install.sh: kubectl is required" >&2; exit 1; }

manifests=$(mktemp)
trap 'rm -f "$manifests" "$manifests.i" "$manifests.f"' EXIT
kubectl kustomize "$here" >"$manifests"

if [ -n "$image" ]; then
    sed "s#image: equilibrium/equilibriumd[:@][^ ]*#image: $image#" "$manifests" >"$manifests.i"
    mv "$manifests.i" "$manifests"
fi

if [ "$mode" != print ] && ! kubectl get crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1; then
    echo "install.sh: no Prometheus Operator CRDs; skipping the ServiceMonitors (scrape the agents' :9500/metrics and the coordinator's :9501/metrics yourself)" >&2
    awk 'BEGIN { RS = "\n---\n"; ORS = "\n---\n" } !/\nkind: ServiceMonitor\n/ && !/^kind: ServiceMonitor\n/' \
        "$manifests" >"$manifests.f" && mv "$manifests.f" "$manifests"
fi

case "$mode" in
    print) cat "$manifests" ;;
    delete) kubectl delete --ignore-not-found -f "$manifests" ;;
    apply)
        # server-side: the dashboards ConfigMap is larger than client-side apply's annotation allows
        kubectl apply --server-side --field-manager=equilibrium-install -f "$manifests"
        kubectl -n equilibrium rollout status daemonset/equilibrium-agent --timeout=300s
        kubectl -n equilibrium rollout status deployment/equilibrium-coordinator --timeout=300s
        ;;
esac
