// Package dashboard serves the operator's web page: a read-only view of the
// cluster (partition map, shards, moves, event flow, cache) that polls a
// JSON summary. Its assets are embedded, so it needs no network at run
// time and no build step.
package dashboard

import (
	"context"
	"embed"
	"io/fs"
	"net/http"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/shardgate/shardgate/auth"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

//go:embed assets
var assets embed.FS

// StatusFunc returns the cluster summary (server.Server.ClusterStatus).
type StatusFunc func(ctx context.Context, maxBacklogAge time.Duration) (*pb.GetClusterStatusResponse, error)

// statusTimeout bounds one summary: the page polls every second and a
// slow answer only delays the next frame.
const statusTimeout = 5 * time.Second

// Register adds the page (/), its assets and its JSON (/api/status) to
// mux. The page itself holds nothing secret; /api/status is what a
// Guard protects when the address is exposed.
func Register(mux *http.ServeMux, status StatusFunc) {
	static, _ := fs.Sub(assets, "assets")
	files := http.FileServerFS(static)
	mux.Handle("GET /{$}", files)
	mux.Handle("GET /dashboard/", http.StripPrefix("/dashboard/", files))
	mux.Handle("GET /api/status", statusHandler(status))
}

var jsonOpts = protojson.MarshalOptions{EmitUnpopulated: true}

func statusHandler(status StatusFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), statusTimeout)
		defer cancel()
		resp, err := status(ctx, 0)
		if err != nil {
			http.Error(w, "status unavailable: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		b, err := jsonOpts.Marshal(resp)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		w.Write(b)
	})
}

// Guard lets a request through only with "Authorization: Bearer <JWT>"
// that v verifies and whose role is admin; anything else is 401 (no or a
// bad token) or 403 (another role). Paths for which open reports true
// (the page's static files) pass without a token.
func Guard(v *auth.Verifier, open func(path string) bool, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if open != nil && open(r.URL.Path) {
			next.ServeHTTP(w, r)
			return
		}
		vals := r.Header.Values("Authorization")
		scheme, raw, ok := "", "", len(vals) == 1
		if ok {
			scheme, raw, ok = strings.Cut(vals[0], " ")
		}
		if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(raw) == "" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="shardgate-admin"`)
			http.Error(w, "an admin bearer token is required (Authorization: Bearer <JWT>)", http.StatusUnauthorized)
			return
		}
		p, err := v.Verify(r.Context(), strings.TrimSpace(raw))
		if err != nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="shardgate-admin", error="invalid_token"`)
			http.Error(w, "invalid token: "+err.Error(), http.StatusUnauthorized)
			return
		}
		if p.Role != auth.RoleAdmin {
			http.Error(w, "the admin role is required", http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// StaticPath reports whether path is one of the page's own files, which
// Guard lets through without a token: the page asks for one itself.
func StaticPath(path string) bool {
	return path == "/" || strings.HasPrefix(path, "/dashboard/")
}
