#!/usr/bin/env bash
# Once per Google Cloud project, before the first `ray up` or GKE cluster (README "First deploy"): the
# head's and the workers' service accounts and what each may do, and the cluster's network. Run the
# rendered copy (`python -m cluster render` fills in the project, region, buckets and SSH range):
#
#   bash rendered/once-gcp.sh
#
# Safe to run again: a step whose result exists already says so and the script goes on.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
project=ddetr-project
region=us-central1
head=ddetr-ray-head@$project.iam.gserviceaccount.com
worker=ddetr-ray-worker@$project.iam.gserviceaccount.com
registry=us-central1-docker.pkg.dev/ddetr-project/ddetr

# Runs a create command; "already exists" is fine, any other error stops the script.
once() {
  local out
  if out=$("$@" 2>&1); then
    echo "$out"
  elif grep -qiE "already exists|alreadyExists" <<<"$out"; then
    echo "exists already: $*"
  else
    echo "$out" >&2
    return 1
  fi
}

gcloud services enable compute.googleapis.com iam.googleapis.com container.googleapis.com \
  artifactregistry.googleapis.com --project $project

# The head starts, labels and deletes the workers (a custom role: gcp-iam/ddetr-ray-head-role.yaml, not
# roles/compute.admin) and passes them their account (roles/iam.serviceAccountUser on that one account,
# not on the project). The workers read the data bucket and write the runs bucket; the head too (the
# drivers run there).
once gcloud iam service-accounts create ddetr-ray-head --project $project --display-name "ddetr Ray head"
once gcloud iam service-accounts create ddetr-ray-worker --project $project --display-name "ddetr Ray workers"
once gcloud iam roles create ddetrRayHead --project $project --file "$here/gcp-iam/ddetr-ray-head-role.yaml"
gcloud iam roles update ddetrRayHead --project $project --file "$here/gcp-iam/ddetr-ray-head-role.yaml" --quiet
gcloud projects add-iam-policy-binding $project --member "serviceAccount:$head" \
  --role projects/$project/roles/ddetrRayHead --condition None
gcloud iam service-accounts add-iam-policy-binding "$worker" --project $project --member "serviceAccount:$head" \
  --role roles/iam.serviceAccountUser
for account in "$head" "$worker"; do
  gcloud storage buckets add-iam-policy-binding gs://ddetr-data --member "serviceAccount:$account" \
    --role roles/storage.objectViewer
  gcloud storage buckets add-iam-policy-binding gs://ddetr-runs --member "serviceAccount:$account" \
    --role roles/storage.objectAdmin
done

# The cluster's network (gcp.yaml's nodes use its subnetwork): SSH from ssh_cidr of the settings only,
# everything between its own machines, and a Cloud NAT through which the workers, which have no external
# IP, pull the image and reach the internet.
once gcloud compute networks create ddetr-ray --project $project --subnet-mode custom
once gcloud compute networks subnets create ddetr-ray --project $project --network ddetr-ray --region $region \
  --range 10.42.0.0/20 --enable-private-ip-google-access
once gcloud compute firewall-rules create ddetr-ray-internal --project $project --network ddetr-ray \
  --allow tcp,udp,icmp --source-ranges 10.42.0.0/20
once gcloud compute firewall-rules create ddetr-ray-ssh --project $project --network ddetr-ray \
  --allow tcp:22 --source-ranges 203.0.113.0/24
once gcloud compute routers create ddetr-ray --project $project --network ddetr-ray --region $region
once gcloud compute routers nats create ddetr-ray --project $project --router ddetr-ray --region $region \
  --auto-allocate-nat-external-ips --nat-all-subnet-ip-ranges

# The image's repository, when the registry is Artifact Registry (<location>-docker.pkg.dev/<project>/<repo>):
# the launcher's nodes pull with their accounts, GKE's nodes with the project's default compute account.
if [[ $registry == *-docker.pkg.dev/* ]]; then
  location=${registry%%-docker.pkg.dev/*}
  repository=${registry##*/}
  once gcloud artifacts repositories create "$repository" --project $project --location "$location" \
    --repository-format docker
  number=$(gcloud projects describe $project --format 'value(projectNumber)')
  for account in "$head" "$worker" "$number-compute@developer.gserviceaccount.com"; do
    gcloud artifacts repositories add-iam-policy-binding "$repository" --project $project --location "$location" \
      --member "serviceAccount:$account" --role roles/artifactregistry.reader
  done
fi
