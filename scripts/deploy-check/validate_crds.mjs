// Validates KEDA custom resources (JSON on stdin: [{file, object}]) against
// the schemas of KEDA's CRDs that the npm package @kubernetes-models/keda
// carries; exits 1 if any is invalid.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";

const kinds = { ScaledObject, TriggerAuthentication };
let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = 0;
for (const { file, object } of JSON.parse(input)) {
  const name = `${file}: ${object.kind}/${object.metadata.name}`;
  const Model = kinds[object.kind];
  if (!Model) {
    console.log(`INVALID ${name}: no schema for ${object.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(object).validate();
    console.log(`ok      ${name}`);
  } catch (e) {
    console.log(`INVALID ${name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
