package dashboard

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/shardgate/shardgate/auth/authtest"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

func testMux() *http.ServeMux {
	mux := http.NewServeMux()
	Register(mux, func(context.Context, time.Duration) (*pb.GetClusterStatusResponse, error) {
		return &pb.GetClusterStatusResponse{TopologyVersion: 7, PartitionCount: 4, Owners: []uint32{0, 1, 0, 1}}, nil
	})
	mux.Handle("/metrics", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "m 1\n") }))
	return mux
}

func get(t *testing.T, h http.Handler, path, token string) (int, string) {
	t.Helper()
	req := httptest.NewRequest("GET", path, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

// The page and its assets are served from the binary; the status is
// GetClusterStatus as JSON.
func TestServesPageAndStatus(t *testing.T) {
	h := testMux()
	for path, want := range map[string]string{
		"/":                    `<div id="map"`,
		"/dashboard/app.js":    "/api/status",
		"/dashboard/style.css": "#map",
	} {
		code, body := get(t, h, path, "")
		if code != 200 || !strings.Contains(body, want) {
			t.Errorf("GET %s: %d, body lacks %q", path, code, want)
		}
	}
	code, body := get(t, h, "/api/status", "")
	var st struct {
		TopologyVersion string `json:"topologyVersion"`
		Owners          []int  `json:"owners"`
		Problems        []string
	}
	if err := json.Unmarshal([]byte(body), &st); code != 200 || err != nil || st.TopologyVersion != "7" || len(st.Owners) != 4 {
		t.Fatalf("GET /api/status: %d %v %s", code, err, body)
	}
	if code, _ := get(t, h, "/nothing", ""); code != 404 {
		t.Errorf("GET /nothing: %d, want 404", code)
	}
	// Nothing on the page loads from elsewhere.
	for _, f := range []string{"index.html", "app.js", "style.css"} {
		b, _ := assets.ReadFile("assets/" + f)
		if strings.Contains(string(b), "http://") || strings.Contains(string(b), "https://") {
			t.Errorf("%s refers to another site", f)
		}
	}
}

// Exposed, everything but the page's own files wants an admin token.
func TestGuard(t *testing.T) {
	keys := authtest.NewKeys(t)
	h := Guard(keys.Verifier(t), StaticPath, testMux())
	admin := keys.Token(t, "admin", "ops")
	service := keys.Token(t, "service", "api")
	cases := []struct {
		path, token string
		want        int
	}{
		{"/", "", 200},
		{"/dashboard/app.js", "", 200},
		{"/api/status", "", 401},
		{"/metrics", "", 401},
		{"/api/status", "not-a-jwt", 401},
		{"/api/status", service, 403},
		{"/metrics", service, 403},
		{"/api/status", admin, 200},
		{"/metrics", admin, 200},
	}
	for _, c := range cases {
		if code, body := get(t, h, c.path, c.token); code != c.want {
			t.Errorf("GET %s (token %.10q): %d %s, want %d", c.path, c.token, code, body, c.want)
		}
	}
	for why, tok := range keys.BadTokens(t) {
		if code, _ := get(t, h, "/api/status", tok); code != 401 {
			t.Errorf("%s: %d, want 401", why, code)
		}
	}
	req := httptest.NewRequest("GET", "/api/status", nil)
	req.Header.Set("Authorization", "Basic "+admin)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != 401 {
		t.Errorf("Basic scheme: %d, want 401", rec.Code)
	}
}
