// Renders an Ollama TEMPLATE with Go's own text/template, as Ollama does, for tests/test_export.py.
//
// stdin: {"template": "...", "cases": [{"Messages": [{"Role": "user", "Content": "hi"}], "System": "", "Prompt": ""}]}
// stdout: a JSON list with one rendered string per case.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

// The fields of Ollama's template values that lorafam's templates use.
type Values struct {
	Messages []Message
	System   string
	Prompt   string
	Response string
}

func main() {
	var input struct {
		Template string
		Cases    []Values
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(input.Template))
	rendered := []string{}
	for _, values := range input.Cases {
		var out strings.Builder
		if err := tmpl.Execute(&out, values); err != nil {
			panic(err)
		}
		rendered = append(rendered, out.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(rendered); err != nil {
		panic(err)
	}
}
