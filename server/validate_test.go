package server

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestValidateUserID(t *testing.T) {
	for _, tc := range []struct {
		id string
		ok bool
	}{
		{"alice", true},
		{"a.b_c:d@e-f", true},
		{"0", true},
		{strings.Repeat("x", 128), true},
		{"", false},
		{strings.Repeat("x", 129), false},
		{"has space", false},
		{"slash/", false},
		{"ünicode", false},
		{"nul\x00", false},
		{"semi;colon", false},
	} {
		err := validateUserID("user_id", tc.id)
		if (err == nil) != tc.ok {
			t.Errorf("validateUserID(%q) = %v, want ok=%v", tc.id, err, tc.ok)
		}
		if err != nil && !strings.HasPrefix(err.Error(), "user_id: ") {
			t.Errorf("error %q does not name the field", err)
		}
	}
}

func TestValidateJSON(t *testing.T) {
	for _, tc := range []struct {
		in     string
		object bool
		ok     bool
	}{
		{`{"a":1}`, true, true},
		{` {"a":1}`, true, true},
		{``, true, true}, // empty object field reads as {}
		{``, false, false},
		{`[1,2]`, true, false},
		{`"s"`, true, false},
		{`[1,2]`, false, true},
		{`42`, false, true},
		{`null`, false, true},
		{`{"a":}`, true, false},
		{`{"a":1}x`, true, false},
		{`{"a":"\u0000"}`, true, false},
		{`{"a":"\\u0000"}`, true, true}, // an escaped backslash, then text
		{`{"a":"\\\u0000"}`, true, false},
		{"{\"a\":\"\xff\"}", true, false},
		{`{"big":"` + strings.Repeat("x", 100) + `"}`, true, false}, // over the test limit of 64
		{`[1e3]`, false, true},
		{`[1e60]`, false, false},  // 5 bytes that Postgres prints as 61
		{`[1E-60]`, false, false}, // and as 0.000…1
		{`[1e-9223372036854775808]`, false, false},
		{`[1e99999999999999999999]`, false, false},
		{strings.Repeat("[", 30) + strings.Repeat("]", 30), false, true},
		{strings.Repeat("[", 65) + strings.Repeat("]", 65), false, false}, // deeper than 64 levels
		{`["\ud83d\ude00"]`, false, true},                                 // a surrogate pair
		{`["\ud800"]`, false, false},                                      // a lone high surrogate
		{`["\udc00x"]`, false, false},                                     // a lone low surrogate
		{`["\ud800\u0041"]`, false, false},
		{`["1e999999"]`, false, true},                                                     // a string, not a number
		{`[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]`, false, false}, // 63 bytes, 93 read back
	} {
		err := validateJSON("f", tc.in, tc.object, 64)
		if (err == nil) != tc.ok {
			t.Errorf("validateJSON(%q, object=%v) = %v, want ok=%v", tc.in, tc.object, err, tc.ok)
		}
	}
}

func TestParseToken(t *testing.T) {
	good, _ := newToken(17)
	if p, err := parseToken("token", good, 4096); err != nil || p != 17 {
		t.Fatalf("parseToken(%q) = %d, %v", good, p, err)
	}
	if p := tokenPartition(good); p != 17 {
		t.Fatalf("tokenPartition(%q) = %d", good, p)
	}
	rnd := good[strings.IndexByte(good, '.')+1:]
	for _, bad := range []string{
		"", "17", "17.", ".abc", "x." + rnd, "-1." + rnd, "4096." + rnd, "017." + rnd,
		"17." + rnd + "A", "17." + rnd[:31] + "!", strings.Repeat("9", 200),
		"17." + rnd[:30] + "\r\n", "17." + rnd[:31] + "=",
	} {
		if _, err := parseToken("token", bad, 4096); err == nil {
			t.Errorf("parseToken(%q) accepted", bad)
		}
	}
}

func TestTokensAreUniqueAndHashed(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		tok, hash := newToken(1)
		if seen[tok] {
			t.Fatal("duplicate token")
		}
		seen[tok] = true
		if len(hash) != 32 || string(hash) == tok {
			t.Fatal("token not hashed with SHA-256")
		}
	}
}

func TestPageEnd(t *testing.T) {
	small := func(int) int { return 10 }
	big := func(int) int { return listPageBytes/2 + 1 }
	for _, tc := range []struct {
		n, size  int
		rowBytes func(int) int
		end      int
		more     bool
	}{
		{0, 10, small, 0, false},
		{5, 10, small, 5, false},
		{11, 10, small, 10, true}, // the extra row says more follow
		{10, 10, small, 10, false},
		{5, 10, big, 1, true}, // two rows would pass the byte budget
		{1, 10, func(int) int { return 3 * listPageBytes }, 1, false}, // one row always fits
	} {
		end, more := pageEnd(tc.n, tc.size, tc.rowBytes)
		if end != tc.end || more != tc.more {
			t.Errorf("pageEnd(%d, %d) = %d, %v; want %d, %v", tc.n, tc.size, end, more, tc.end, tc.more)
		}
	}
}

func TestPageTokenRoundTrip(t *testing.T) {
	for _, k := range []string{"a", "ключ", "with space/and:colon"} {
		got, err := decodePageToken("page_token", encodePageToken(k))
		if err != nil || got != k {
			t.Errorf("round trip of %q = %q, %v", k, got, err)
		}
	}
	if _, err := decodePageToken("page_token", "!!!"); err == nil {
		t.Error("garbage page token accepted")
	}
}

// The fuzz targets check that validators never panic and that what they
// accept is safe for the layers below. Seeds live in testdata/fuzz.

func FuzzValidateJSON(f *testing.F) {
	for _, s := range []string{`{}`, `{"a":[1,{"b":null}]}`, `"\u0000"`, `[`, "\xff", `{"a":"\\u0000"}`, `1e999999`,
		`[1e131071]`, `{"a":1E-16383}`, strings.Repeat("[", 100) + strings.Repeat("]", 100)} {
		f.Add(s, true)
		f.Add(s, false)
	}
	f.Fuzz(func(t *testing.T, s string, object bool) {
		err := validateJSON("f", s, object, 1<<16)
		if err != nil {
			var fe *fieldError
			if !errors.As(err, &fe) || fe.field != "f" {
				t.Fatalf("error %v is not a fieldError for f", err)
			}
			return
		}
		b := storedJSON(s, object)
		if !utf8.Valid(b) || strings.Contains(string(b), "\x00") {
			t.Fatalf("accepted %q, which Postgres cannot store", b)
		}
		if object && strings.TrimSpace(string(b))[0] != '{' {
			t.Fatalf("accepted non-object %q", b)
		}
		if !json.Valid(b) {
			t.Fatalf("accepted invalid JSON %q", b)
		}
	})
}

func FuzzParseToken(f *testing.F) {
	good, _ := newToken(4095)
	for _, s := range []string{good, "", "0.", "1.AAAA", "99999999." + good} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := parseToken("token", s, 4096)
		if err == nil && (p < 0 || p >= 4096) {
			t.Fatalf("parseToken(%q) = partition %d out of range", s, p)
		}
		if err == nil && tokenPartition(s) != p {
			t.Fatalf("tokenPartition(%q) = %d, parseToken says %d", s, tokenPartition(s), p)
		}
	})
}

func FuzzValidateIdentifiers(f *testing.F) {
	for _, s := range []string{"alice", "", "a b", "ключ", "\x00", strings.Repeat("z", 300)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if validateUserID("user_id", s) == nil {
			if len(s) == 0 || len(s) > maxUserID {
				t.Fatalf("user ID %q accepted", s)
			}
		}
		if validateName("collection", s) == nil && (strings.ContainsAny(s, ":@/") || len(s) > maxName) {
			t.Fatalf("collection %q accepted", s)
		}
		if validateKey("key", s, false) == nil && (!utf8.ValidString(s) || strings.ContainsRune(s, 0) || len(s) > maxKey) {
			t.Fatalf("key %q accepted", s)
		}
	})
}

func FuzzPageToken(f *testing.F) {
	f.Add("a")
	f.Add("")
	f.Add("\xff")
	f.Fuzz(func(t *testing.T, s string) {
		k, err := decodePageToken("page_token", s)
		if err == nil && s != "" && validateKey("key", k, false) != nil {
			t.Fatalf("page token %q decodes to invalid key %q", s, k)
		}
		if hk, herr := pageTokenKey("page_token", s); err == nil && (herr != nil || hk != k) {
			t.Fatalf("page token %q: the handler reads %q, %v; the check %q", s, hk, herr, k)
		}
		if sk, err := decodeSessionPageToken("page_token", s); err == nil && s != "" && len(sk.TokenHash) != 32 {
			t.Fatalf("session page token %q decodes to a %d-byte hash", s, len(sk.TokenHash))
		}
	})
}

// BenchmarkValidateJSON measures validating a 60 KiB value; compare with
// the json.Valid sub-benchmark, the floor for any validator.
func BenchmarkValidateJSON(b *testing.B) {
	in := `[` + strings.Repeat(`{"a":1.5e3,"b":"text \u00e9"},`, 2000) // 60 KB
	in = in[:len(in)-1] + "]"
	b.Run("json.Valid", func(b *testing.B) {
		b.SetBytes(int64(len(in)))
		for b.Loop() {
			json.Valid([]byte(in))
		}
	})
	b.Run("validateJSON", func(b *testing.B) {
		b.SetBytes(int64(len(in)))
		b.ReportAllocs()
		for b.Loop() {
			if err := validateJSON("f", in, false, 1<<20); err != nil {
				b.Fatal(err)
			}
		}
	})
}
