// Command livenessprobe-standin is a TEST STAND-IN for the kubernetes-csi livenessprobe
// sidecar, whose module the Go module proxy does not serve. Like the real one it serves
// /healthz on --http-endpoint and answers 200 only when the CSI driver's Probe call succeeds
// and reports ready. It is built and used only by the test cluster; deploy/ names the real image.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"strings"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the CSI driver's socket")
	httpEndpoint := flag.String("http-endpoint", ":9808", "serve /healthz here")
	probeTimeout := flag.Duration("probe-timeout", time.Second, "timeout of the Probe call")
	flag.Int("v", 0, "accepted for compatibility; logging has one level")
	flag.Parse()

	target := *csiAddress
	if !strings.HasPrefix(target, "unix://") {
		target = "unix://" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	identity := csi.NewIdentityClient(conn)
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *probeTimeout)
		defer cancel()
		reply, err := identity.Probe(ctx, &csi.ProbeRequest{})
		if err != nil {
			log.Printf("health check failed: %v", err)
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if ready := reply.GetReady(); ready != nil && !ready.GetValue() {
			http.Error(w, "driver is not ready", http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	log.Printf("serving /healthz on %s for %s", *httpEndpoint, *csiAddress)
	log.Fatal(http.ListenAndServe(*httpEndpoint, nil))
}
