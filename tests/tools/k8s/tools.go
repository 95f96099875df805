//go:build tools

// Package tools pins the Kubernetes control plane and the CSI sidecar that the end-to-end
// tests run for real: etcd, kube-apiserver, kube-controller-manager and csi-provisioner.
// They are built from the Go module proxy at the versions in go.mod (see the Makefile).
package tools

import (
	_ "github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner"
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
