package server

import (
	"strings"
	"testing"
)

// FuzzConfigSchema compiles arbitrary schemas and checks arbitrary values
// against the ones that compile: no panics, and every refusal names a JSON
// pointer.
func FuzzConfigSchema(f *testing.F) {
	f.Add(limitsSchema, `{"max": 1}`)
	f.Add(limitsSchema, `{"max": "x", "tags": [1]}`)
	f.Add(`{"type":"array","items":{"pattern":"^a+$"}}`, `["aaa","b"]`)
	f.Add(`{"$ref":"#/$defs/x","$defs":{"x":{"type":"string"}}}`, `1`)
	f.Add(`{"properties":{"a/b~c":{"const":1}}}`, `{"a/b~c":2}`)
	f.Add(`{"$ref":"file:///etc/passwd"}`, `1`)
	f.Fuzz(func(t *testing.T, schema, value string) {
		if len(schema) > 4096 || len(value) > 4096 {
			return
		}
		sch, err := compileSchema(schema)
		if err != nil {
			return
		}
		if validateJSON("value_json", value, false, 1<<16) != nil {
			return
		}
		if err := checkValue(sch, "value_json", storedJSON(value, false)); err != nil {
			if !strings.HasPrefix(err.Error(), `value_json: at "`) {
				t.Fatalf("refusal without a path: %v", err)
			}
		}
	})
}
