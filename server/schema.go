package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"strings"
	"sync"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"golang.org/x/text/language"
	"golang.org/x/text/message"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// schemaURL is where a namespace's schema lives for the compiler; nothing
// is ever fetched from it.
const schemaURL = "urn:shardgate:config-schema"

// noLoader refuses every external reference: a schema may not read files
// or fetch URLs on the server.
type noLoader struct{}

func (noLoader) Load(url string) (any, error) {
	return nil, errors.New("external references are not allowed")
}

// schemaCache holds compiled schemas by the SHA-256 of their text, so a
// SetConfig pays the compilation once per schema version.
type schemaCache struct {
	mu sync.Mutex
	m  map[[32]byte]*jsonschema.Schema
}

const maxCachedSchemas = 256

// compileSchema compiles a schema text, refusing external references.
func compileSchema(text string) (*jsonschema.Schema, error) {
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(text))
	if err != nil {
		return nil, err
	}
	c := jsonschema.NewCompiler()
	c.UseLoader(noLoader{})
	c.DefaultDraft(jsonschema.Draft2020)
	if err := c.AddResource(schemaURL, doc); err != nil {
		return nil, err
	}
	return c.Compile(schemaURL)
}

func (c *schemaCache) get(text string) (*jsonschema.Schema, error) {
	sum := sha256.Sum256([]byte(text))
	c.mu.Lock()
	sch, ok := c.m[sum]
	c.mu.Unlock()
	if ok {
		return sch, nil
	}
	sch, err := compileSchema(text)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.m == nil || len(c.m) >= maxCachedSchemas {
		c.m = map[[32]byte]*jsonschema.Schema{}
	}
	c.m[sum] = sch
	c.mu.Unlock()
	return sch, nil
}

var schemaPrinter = message.NewPrinter(language.English)

// checkValue validates a JSON value against sch. A failure is a fieldError
// on field naming the JSON pointer of the first offending value.
func checkValue(sch *jsonschema.Schema, field string, value []byte) error {
	v, err := jsonschema.UnmarshalJSON(bytes.NewReader(value))
	if err != nil {
		return invalid(field, "not valid JSON")
	}
	err = sch.Validate(v)
	if err == nil {
		return nil
	}
	var ve *jsonschema.ValidationError
	if !errors.As(err, &ve) {
		return invalid(field, "does not match the namespace's schema")
	}
	leaf := firstLeaf(ve)
	return invalid(field, "at %s: %s", jsonPointer(leaf.InstanceLocation), leaf.ErrorKind.LocalizedString(schemaPrinter))
}

// firstLeaf returns the deepest first cause: the most specific reason.
func firstLeaf(e *jsonschema.ValidationError) *jsonschema.ValidationError {
	for len(e.Causes) > 0 {
		e = e.Causes[0]
	}
	return e
}

// jsonPointer renders a path as an RFC 6901 JSON pointer, quoted ("" is the
// whole value).
func jsonPointer(tokens []string) string {
	var sb strings.Builder
	sb.WriteByte('"')
	for _, t := range tokens {
		sb.WriteByte('/')
		t = strings.ReplaceAll(t, "~", "~0")
		sb.WriteString(strings.ReplaceAll(t, "/", "~1"))
	}
	sb.WriteByte('"')
	return sb.String()
}

// setConfig writes a config value, checked against its namespace's schema.
func (s *Server) setConfig(ctx context.Context, namespace, key string, value []byte, expected *int64) (int64, error) {
	return s.catalog.SetConfigChecked(ctx, namespace, key, value, expected, func(text string) error {
		sch, err := s.schemas.get(text)
		if err != nil {
			// Stored schemas compiled when they were set; a failure now is ours.
			return errors.New("stored config schema does not compile")
		}
		return checkValue(sch, "value_json", value)
	})
}

// SetConfigSchema sets or removes a namespace's JSON Schema.
func (a *AdminService) SetConfigSchema(ctx context.Context, req *pb.SetConfigSchemaRequest) (*pb.SetConfigSchemaResponse, error) {
	text := req.GetSchemaJson()
	var sch *jsonschema.Schema
	if text != "" {
		var err error
		if sch, err = a.s.schemas.get(text); err != nil {
			return nil, invalid("schema_json", "not a valid JSON Schema: %s", schemaCompileReason(err))
		}
	}
	err := a.s.catalog.SetConfigSchema(ctx, req.GetNamespace(), text, func(key string, value []byte) error {
		if err := checkValue(sch, "schema_json", value); err != nil {
			fe := err.(*fieldError)
			return invalid("schema_json", "existing value of key %q does not conform: %s", key, fe.msg)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &pb.SetConfigSchemaResponse{}, nil
}

// schemaCompileReason keeps the first line of a compile error, without the
// internal schema URL.
func schemaCompileReason(err error) string {
	msg, _, _ := strings.Cut(err.Error(), "\n")
	msg = strings.ReplaceAll(msg, schemaURL, "schema")
	if len(msg) > 300 {
		msg = msg[:300] + "…"
	}
	return msg
}

// GetConfigSchema returns a namespace's JSON Schema.
func (a *AdminService) GetConfigSchema(ctx context.Context, req *pb.GetConfigSchemaRequest) (*pb.GetConfigSchemaResponse, error) {
	text, at, err := a.s.catalog.GetConfigSchema(ctx, req.GetNamespace())
	if err != nil {
		return nil, err
	}
	return &pb.GetConfigSchemaResponse{SchemaJson: text, UpdatedAt: timestamppb.New(at)}, nil
}
