//go:build tools

// Package tools pins the volume snapshot parts the snapshot tests run for real: the
// snapshot-controller and the csi-snapshotter sidecar of external-snapshotter, and the
// snapshot CRDs of its client module. Built from the Go module proxy at the versions in go.mod
// (see the Makefile).
package tools

import (
	_ "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	_ "github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter"
	_ "github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller"
)
