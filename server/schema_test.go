package server

import (
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

const limitsSchema = `{
  "type": "object",
  "properties": {
    "max": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string"}}
  },
  "required": ["max"]
}`

func TestConfigSchema(t *testing.T) {
	ts := newTestCluster(t, 1).start(t, false)
	ctx := ctxT(t)
	set := func(key, value string) error {
		_, err := ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "limits", Key: key, ValueJson: value})
		return err
	}
	if err := set("a", `{"max": 3}`); err != nil {
		t.Fatal(err)
	}
	if err := set("b", `{"max": "three"}`); err != nil {
		t.Fatal(err)
	}
	// An existing value does not conform: the schema is refused, naming it.
	_, err := ts.admin.SetConfigSchema(ctx, &pb.SetConfigSchemaRequest{Namespace: "limits", SchemaJson: limitsSchema})
	wantCode(t, err, codes.InvalidArgument)
	if msg := status.Convert(err).Message(); !strings.Contains(msg, `"b"`) || !strings.Contains(msg, `"/max"`) {
		t.Fatalf("message %q does not name the key and path", msg)
	}
	_, err = ts.admin.GetConfigSchema(ctx, &pb.GetConfigSchemaRequest{Namespace: "limits"})
	wantCode(t, err, codes.NotFound)

	if err := set("b", `{"max": 4}`); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.admin.SetConfigSchema(ctx, &pb.SetConfigSchemaRequest{Namespace: "limits", SchemaJson: limitsSchema}); err != nil {
		t.Fatal(err)
	}
	got, err := ts.admin.GetConfigSchema(ctx, &pb.GetConfigSchemaRequest{Namespace: "limits"})
	if err != nil || got.GetSchemaJson() != limitsSchema {
		t.Fatalf("GetConfigSchema: %v %q", err, got.GetSchemaJson())
	}
	err = set("c", `{"max": 1, "tags": ["x", 7]}`)
	wantCode(t, err, codes.InvalidArgument)
	if msg := status.Convert(err).Message(); !strings.HasPrefix(msg, `value_json: at "/tags/1"`) {
		t.Fatalf("message %q does not name the path", msg)
	}
	wantCode(t, set("c", `{}`), codes.InvalidArgument)
	if err := set("c", `{"max": 1, "tags": ["x"]}`); err != nil {
		t.Fatal(err)
	}
	// Other namespaces are free.
	if _, err := ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: "free", Key: "k", ValueJson: `"anything"`}); err != nil {
		t.Fatal(err)
	}
	// Removing the schema frees the namespace.
	if _, err := ts.admin.SetConfigSchema(ctx, &pb.SetConfigSchemaRequest{Namespace: "limits"}); err != nil {
		t.Fatal(err)
	}
	if err := set("d", `"no longer an object"`); err != nil {
		t.Fatal(err)
	}
}

func TestConfigSchemaRefusesBadSchemas(t *testing.T) {
	ts := newTestCluster(t, 1).start(t, false)
	ctx := ctxT(t)
	for name, schema := range map[string]string{
		"not JSON":       `{`,
		"not a schema":   `{"type": 7}`,
		"file reference": `{"$ref": "file:///etc/passwd"}`,
		"URL reference":  `{"$ref": "http://127.0.0.1:1/schema.json"}`,
	} {
		_, err := ts.admin.SetConfigSchema(ctx, &pb.SetConfigSchemaRequest{Namespace: "ns", SchemaJson: schema})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: got %v, want InvalidArgument", name, err)
		}
	}
}

// A value written concurrently with a new schema either lands before the
// schema's check (and then blocks the schema) or is checked against it:
// never a schema in place with a non-conforming value.
func TestConfigSchemaRace(t *testing.T) {
	ts := newTestCluster(t, 1).start(t, false)
	ctx := ctxT(t)
	for round := range 20 {
		ns := "race" + string(rune('a'+round))
		var wg sync.WaitGroup
		var setErr, schemaErr error
		wg.Go(func() {
			_, setErr = ts.data.SetConfig(ctx, &pb.SetConfigRequest{Namespace: ns, Key: "k", ValueJson: `{"max": "bad"}`})
		})
		wg.Go(func() {
			_, schemaErr = ts.admin.SetConfigSchema(ctx, &pb.SetConfigSchemaRequest{Namespace: ns, SchemaJson: limitsSchema})
		})
		wg.Wait()
		if (setErr == nil) == (schemaErr == nil) {
			t.Fatalf("round %d: SetConfig %v, SetConfigSchema %v: exactly one must win", round, setErr, schemaErr)
		}
	}
}
